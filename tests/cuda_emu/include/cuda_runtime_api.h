// Emulator stand-in for the CUDA toolkit header of this name (see tri_cuda_emu.h).
#pragma once
#include "tri_cuda_emu.h"
