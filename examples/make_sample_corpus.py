#!/usr/bin/env python
"""Writes a small multilingual sample corpus: one JSONL per domain (en, ko, ja, code, math), no downloads.

Documents are generated deterministically (seeded) from templates and word lists in this file, so the
quickstart (corpus -> tokenizer -> preprocess -> train) runs anywhere. Each line is
{"id": ..., "lang": <domain>, "text": ...}. The default size is ~60-90 KB per domain.

    python examples/make_sample_corpus.py --output data/sample
"""
import argparse
import json
import os
import random

EN = {
    "adj": "quiet bright ancient curious gentle rapid hidden golden narrow patient clever distant humble modern".split(),
    "noun": ("river teacher garden engine village scientist library mountain market student bridge forest "
             "harbor painter window machine farmer journey signal lantern").split(),
    "verb": "watches builds crosses studies follows repairs describes remembers visits measures carries opens".split(),
    "place": "the old station|the northern coast|a small workshop|the city square|a crowded train|the valley".split("|"),
    "time": "In the morning|After the storm|Every winter|Long ago|By evening|During the festival".split("|"),
}
EN_TEMPLATES = [
    "The {adj} {noun} {verb} the {noun2} near {place}.",
    "{time}, a {adj} {noun} {verb} a {adj2} {noun2}.",
    "Nobody knew why the {noun} {verb} the {noun2} at {place}, but everyone agreed it was {adj}.",
    "{time} the {noun2} was {adj}, so the {noun} {verb} it again.",
    "A {adj} {noun} rarely {verb} {place} without a {noun2}.",
]

# (word, has_final_consonant is computed from the last syllable)
KO = {
    "subj": "학생 선생님 고양이 친구 할머니 연구원 아이 요리사 기자 의사 화가 농부".split(),
    "obj": "책 사과 편지 음악 그림 사진 지도 커피 신문 노래 꽃 컴퓨터".split(),
    "place": "도서관 공원 학교 시장 바닷가 카페 기차역 박물관 병원 마을".split(),
    "verb": ["읽었습니다", "샀습니다", "보냈습니다", "들었습니다", "그렸습니다", "찍었습니다", "만들었습니다",
             "좋아합니다", "찾았습니다", "기다렸습니다"],
    "time": "어제 오늘 아침에 주말에 작년에 저녁에 오랜만에 매일".split(),
    "adj": "조용한 아름다운 오래된 새로운 작은 따뜻한 유명한 복잡한".split(),
}
JA = {
    "subj": "学生 先生 猫 友達 祖母 研究者 子供 料理人 記者 医者 画家 農家".split(),
    "obj": "本 りんご 手紙 音楽 絵 写真 地図 コーヒー 新聞 歌 花 コンピューター".split(),
    "place": "図書館 公園 学校 市場 海辺 カフェ 駅 博物館 病院 村".split(),
    "verb": "読みました 買いました 送りました 聞きました 描きました 撮りました 作りました 探しました 待ちました".split(),
    "time": "昨日 今日 朝 週末に 去年 夕方 久しぶりに 毎日".split(),
    "adj": "静かな 美しい 古い 新しい 小さな 暖かい 有名な 不思議な".split(),
}
JA_TEMPLATES = [
    "{time}、{subj}は{place}で{obj}を{verb}。",
    "{adj}{place}で、{subj}が{obj}を{verb}。",
    "{subj}は{adj}{obj}がとても好きです。",
    "{time}は{place}に行って、{obj}を{verb}。それから{subj}と話しました。",
]


def _batchim(word: str) -> bool:
    code = ord(word[-1]) - 0xAC00
    return 0 <= code < 11172 and code % 28 != 0


def _ko_particle(word: str, with_final: str, without_final: str) -> str:
    return word + (with_final if _batchim(word) else without_final)


def ko_sentence(rng: random.Random) -> str:
    s, o, p = rng.choice(KO["subj"]), rng.choice(KO["obj"]), rng.choice(KO["place"])
    t, v, a = rng.choice(KO["time"]), rng.choice(KO["verb"]), rng.choice(KO["adj"])
    forms = [
        f"{t} {_ko_particle(s, '은', '는')} {p}에서 {_ko_particle(o, '을', '를')} {v}.",
        f"{a} {p}에서 {_ko_particle(s, '이', '가')} {_ko_particle(o, '을', '를')} {v}.",
        f"{_ko_particle(s, '은', '는')} {a} {_ko_particle(o, '을', '를')} 정말 좋아합니다.",
        f"{t} {p}에 가서 {_ko_particle(o, '을', '를')} {v}. 그리고 {_ko_particle(s, '과', '와')} 이야기했습니다.",
    ]
    return rng.choice(forms)


def en_sentence(rng: random.Random) -> str:
    pick = {k: rng.choice(v) for k, v in EN.items()}
    return rng.choice(EN_TEMPLATES).format(noun2=rng.choice(EN["noun"]), adj2=rng.choice(EN["adj"]), **pick)


def ja_sentence(rng: random.Random) -> str:
    return rng.choice(JA_TEMPLATES).format(**{k: rng.choice(v) for k, v in JA.items()})


def paragraph(rng: random.Random, sentence, joiner: str, lo: int, hi: int) -> str:
    return joiner.join(sentence(rng) for _ in range(rng.randint(lo, hi)))


def code_doc(rng: random.Random) -> str:
    names = "total values items scores counts prices weights sizes".split()
    funcs = "compute_sum average largest count_even scale_all running_total clip_values".split()
    name, arr, other = rng.choice(funcs), rng.choice(names), rng.choice(names)
    k, lim = rng.randint(2, 9), rng.randint(10, 99)
    bodies = [
        f"def {name}({arr}):\n    result = 0\n    for x in {arr}:\n        result += x\n    return result\n",
        f"def {name}({arr}, k={k}):\n    return [x * k for x in {arr} if x < {lim}]\n",
        f"def {name}({arr}):\n    if not {arr}:\n        return None\n    best = {arr}[0]\n    for x in {arr}[1:]:\n"
        f"        if x > best:\n            best = x\n    return best\n",
        f"class {name.title().replace('_', '')}:\n    def __init__(self, {other}):\n        self.{other} = list({other})\n\n"
        f"    def __len__(self):\n        return len(self.{other})\n\n    def top(self, n={k}):\n"
        f"        return sorted(self.{other}, reverse=True)[:n]\n",
        f"import math\n\n\ndef {name}({arr}):\n    \"\"\"Return the root mean square of {arr}.\"\"\"\n"
        f"    return math.sqrt(sum(x * x for x in {arr}) / max(1, len({arr})))\n",
    ]
    test = f"\n\nif __name__ == \"__main__\":\n    print({name}([{', '.join(str(rng.randint(0, lim)) for _ in range(k))}]))\n"
    return "\n\n".join(rng.sample(bodies, rng.randint(1, 3))) + test


def math_doc(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 4)):
        kind = rng.randint(0, 3)
        a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 50)
        if kind == 0:
            parts.append(f"Problem: Compute {a} * {b} + {c}.\nSolution: {a} * {b} = {a * b}, and {a * b} + {c} = "
                         f"{a * b + c}.\nAnswer: {a * b + c}")
        elif kind == 1:
            x = rng.randint(-20, 20)
            parts.append(f"Problem: Solve {a}x + {c} = {a * x + c}.\nSolution: Subtract {c} from both sides: "
                         f"{a}x = {a * x}. Divide by {a}: x = {x}.\nAnswer: x = {x}")
        elif kind == 2:
            parts.append(f"Problem: Find the area of a rectangle with sides {a} and {b}.\nSolution: The area is "
                         f"$A = {a} \\times {b} = {a * b}$.\nAnswer: {a * b}")
        else:
            n = rng.randint(3, 30)
            parts.append(f"Problem: What is the sum of the integers from 1 to {n}?\nSolution: By Gauss, "
                         f"$\\sum_{{k=1}}^{{{n}}} k = \\frac{{{n}({n}+1)}}{{2}} = {n * (n + 1) // 2}$.\n"
                         f"Answer: {n * (n + 1) // 2}")
    return "\n\n".join(parts)


DOMAINS = {
    "en": lambda rng: "\n\n".join(paragraph(rng, en_sentence, " ", 3, 7) for _ in range(rng.randint(1, 3))),
    "ko": lambda rng: "\n\n".join(paragraph(rng, ko_sentence, " ", 3, 7) for _ in range(rng.randint(1, 3))),
    "ja": lambda rng: "\n\n".join(paragraph(rng, ja_sentence, "", 3, 7) for _ in range(rng.randint(1, 3))),
    "code": code_doc,
    "math": math_doc,
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="directory for <domain>.jsonl files")
    parser.add_argument("--docs-per-domain", type=int, default=200)
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated subset of " + ",".join(DOMAINS))
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    os.makedirs(args.output, exist_ok=True)
    for offset, domain in enumerate(d for d in args.domains.split(",") if d):
        if domain not in DOMAINS:
            parser.error(f"--domains: unknown domain {domain!r}; choose from {','.join(DOMAINS)}")
        rng = random.Random(args.seed * 1000 + offset)
        path = os.path.join(args.output, f"{domain}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i in range(args.docs_per_domain):
                f.write(json.dumps({"id": f"{domain}-{i}", "lang": domain, "text": DOMAINS[domain](rng)},
                                   ensure_ascii=False) + "\n")
        print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KB, {args.docs_per_domain} documents)")


if __name__ == "__main__":
    main()
