"""``python -m tri_megatron.dryrun --world-size N <pretrain_tri.py flags>``: the dry run (see the package)."""

import sys
import warnings

warnings.filterwarnings("ignore")  # megatron-core's import-time notes about optional kernels

from tri_megatron.dryrun import main  # noqa: E402

sys.exit(main())
