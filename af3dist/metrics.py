"""Caption metrics against all references of each clip, with the COCO caption toolkit (pycocoevalcap).

CIDEr-D (pycocoevalcap's `Cider` is the CIDEr-D variant: clipped n-gram counts and a length penalty),
BLEU-1..4 and ROUGE-L always; METEOR only where Java is present (it runs the METEOR 1.5 jar), and the
result says so when it is skipped. Text is tokenized with the PTB tokenizer when Java is there, else
with the same lower-casing and punctuation stripping in Python.
"""

from __future__ import annotations

import logging
import re
import shutil

log = logging.getLogger(__name__)

_PUNCT = re.compile(r"[^\w\s']")


def java_available() -> bool:
    return shutil.which("java") is not None


def _simple_tokenize(texts: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: [" ".join(_PUNCT.sub(" ", t.lower()).split()) for t in v] for k, v in texts.items()}


def _tokenize(texts: dict[str, list[str]], use_java: bool) -> dict[str, list[str]]:
    if not use_java:
        return _simple_tokenize(texts)
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": t} for t in v] for k, v in texts.items()})


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]],
                    use_java: bool | None = None) -> dict[str, float | str | None]:
    """Corpus-level scores for predictions {clip: caption} against references {clip: [captions]}."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not predictions:
        raise ValueError("no predictions to score")
    missing = set(predictions) - set(references)
    if missing:
        raise ValueError(f"{len(missing)} predictions have no references, e.g. {sorted(missing)[:3]}")
    use_java = java_available() if use_java is None else use_java
    keys = sorted(predictions)
    res = _tokenize({k: [predictions[k] or ""] for k in keys}, use_java)
    gts = _tokenize({k: list(references[k]) for k in keys}, use_java)
    # An empty hypothesis makes the BLEU scorer fail; score it as one unknown word instead.
    res = {k: [v[0] if v[0].strip() else "<empty>"] for k, v in res.items()}

    scores: dict[str, float | str | None] = {"num_clips": len(keys)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, 1):
        scores[f"bleu_{n}"] = float(b)
    scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    scores["cider_d"] = float(Cider().compute_score(gts, res)[0])
    if use_java:
        from pycocoevalcap.meteor.meteor import Meteor

        meteor = Meteor()
        try:
            scores["meteor"] = float(meteor.compute_score(gts, res)[0])
        finally:
            meteor.close() if hasattr(meteor, "close") else None
    else:
        scores["meteor"] = None
        scores["meteor_skipped"] = "no Java runtime found (METEOR needs `java` on PATH)"
        log.warning("METEOR skipped: no Java runtime found")
    return scores
