"""The synthetic AudioCaps vocabulary: sound classes, their captions, and "X followed by Y" sequence labels.

All caption texts are distinct across labels, so a caption maps back to exactly one label: a test can tell
whether a tiny model's caption names the right sound.
"""

from __future__ import annotations

SEQUENCE_SEPARATOR = "+"
"""Joins the two event classes of a sequence label, e.g. ``"high_tone+white_noise"``."""

# class -> (full captions used for single-event clips, short noun phrases used to
# build sequence captions).  All texts are distinct across classes so a caption
# maps back to exactly one label.
_CLASS_TEXT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "low_tone": (
        (
            "A low steady tone hums",
            "A deep constant hum is heard",
            "A low-pitched tone drones steadily",
            "A steady low hum continues without change",
            "A low humming sound plays continuously",
            "A constant deep drone is heard",
        ),
        ("a low tone", "a deep hum", "a low steady hum", "a deep droning tone"),
    ),
    "high_tone": (
        (
            "A high-pitched tone rings steadily",
            "A shrill continuous tone sounds",
            "A high steady whine is heard",
            "A sharp high-pitched tone plays continuously",
            "A constant high tone rings out",
            "A piercing high tone sounds without stopping",
        ),
        ("a high tone", "a shrill whine", "a high-pitched tone", "a piercing tone"),
    ),
    "rising_chirp": (
        (
            "A tone sweeps upward in pitch",
            "A rising whistle climbs higher and higher",
            "A sound rises steadily in pitch",
            "A sweeping tone glides from low to high",
            "An upward pitch sweep is heard",
            "A whistling tone rises in pitch",
        ),
        ("a rising sweep", "an upward chirp", "a rising whistle", "a tone sweeping upward"),
    ),
    "white_noise": (
        (
            "White noise hisses steadily",
            "A loud static hiss is heard",
            "Constant hissing static plays",
            "A harsh steady hiss fills the air",
            "Static noise hisses continuously",
            "A bright hissing noise is heard",
        ),
        ("white noise", "a static hiss", "a harsh hiss", "loud static"),
    ),
    "pink_noise": (
        (
            "A soft steady rushing noise is heard",
            "Pink noise rushes steadily",
            "A smooth whooshing noise continues",
            "A gentle rushing sound like a waterfall plays",
            "A steady rushing noise similar to rain is heard",
            "A soft broadband rush continues steadily",
        ),
        ("pink noise", "a soft rushing noise", "a gentle whoosh", "a steady rush"),
    ),
    "brown_noise": (
        (
            "A deep rumbling noise is heard",
            "Low rumbling noise continues steadily",
            "Brown noise rumbles in a low roar",
            "A muffled roar rumbles constantly",
            "A deep low rumble like distant thunder continues",
            "A heavy rumbling roar is heard",
        ),
        ("a deep rumble", "brown noise", "a low roar", "a muffled rumble"),
    ),
    "beeps": (
        (
            "A series of short beeps is heard",
            "Electronic beeps repeat at a steady pace",
            "A device beeps repeatedly",
            "Short beeping sounds repeat several times",
            "Rapid beeps sound over and over",
            "A beeping alarm pulses regularly",
        ),
        ("repeated beeps", "a series of beeps", "short beeping", "rhythmic beeps"),
    ),
    "buzz": (
        (
            "A harsh electric buzzing is heard",
            "A loud buzzing drone continues",
            "Something buzzes steadily",
            "A coarse buzz hums on and on",
            "An electrical buzz sounds continuously",
            "A raspy buzzing noise is heard",
        ),
        ("a buzzing", "an electric buzz", "a harsh buzz", "a raspy drone"),
    ),
    "clicks": (
        (
            "Several clicks are heard in silence",
            "Sharp clicking sounds occur sporadically",
            "A few isolated clicks break the silence",
            "Quiet tapping clicks occur now and then",
            "Scattered clicks are heard against silence",
            "Occasional sharp ticks sound",
        ),
        ("a few clicks", "sporadic clicking", "sharp clicks", "scattered ticks"),
    ),
}

SOUND_CLASSES: list[str] = list(_CLASS_TEXT)
"""The single-event sound classes, in a fixed order.  Sequence labels combine two of them."""

# Templates for "X followed by Y" captions; {a}/{b} are the two classes' short phrases.
_SEQUENCE_TEMPLATES: tuple[str, ...] = (
    "{a} followed by {b}",
    "{a}, then {b}",
    "{a} and then {b}",
    "first {a}, then {b}",
    "{a} is followed by {b}",
    "{a} gives way to {b}",
    "{a} stops and {b} begins",
    "{a} ends as {b} starts",
)


def sequence_label(first: str, second: str) -> str:
    """Label of a two-event clip ("first followed by second"), e.g. ``"beeps+buzz"``."""
    for name in (first, second):
        if name not in _CLASS_TEXT:
            raise ValueError(f"unknown sound class {name!r}")
    if first == second:
        raise ValueError("a sequence needs two different classes")
    return f"{first}{SEQUENCE_SEPARATOR}{second}"


def split_label(label: str) -> tuple[str, ...]:
    """The event classes of a label in time order: ``("buzz",)`` or ``("beeps", "buzz")``."""
    parts = tuple(label.split(SEQUENCE_SEPARATOR))
    if not 1 <= len(parts) <= 2 or any(p not in _CLASS_TEXT for p in parts):
        raise ValueError(f"unknown label {label!r}")
    if len(parts) == 2 and parts[0] == parts[1]:
        raise ValueError(f"unknown label {label!r}")
    return parts


def all_labels() -> list[str]:
    """Every label the generator can emit: the single classes, then all ordered pairs."""
    pairs = [sequence_label(a, b) for a in SOUND_CLASSES for b in SOUND_CLASSES if a != b]
    return list(SOUND_CLASSES) + pairs


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _build_captions() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for name, (full, _short) in _CLASS_TEXT.items():
        table[name] = tuple(full)
    for label in all_labels()[len(SOUND_CLASSES) :]:
        a, b = split_label(label)
        short_a, short_b = _CLASS_TEXT[a][1], _CLASS_TEXT[b][1]
        table[label] = tuple(
            _capitalize(t.format(a=short_a[k % len(short_a)], b=short_b[(k + 1) % len(short_b)]))
            for k, t in enumerate(_SEQUENCE_TEMPLATES)
        )
    return table


_CAPTIONS = _build_captions()
_CAPTION_TO_LABEL: dict[str, str] = {}
for _label, _texts in _CAPTIONS.items():
    if len(set(_texts)) != len(_texts) or len(_texts) < 6:
        raise AssertionError(f"captions of {_label!r} must be >= 6 and distinct")
    for _text in _texts:
        if _text in _CAPTION_TO_LABEL:
            raise AssertionError(f"caption {_text!r} is shared by two labels")
        _CAPTION_TO_LABEL[_text] = _label


def captions_for(label: str) -> list[str]:
    """All caption paraphrases for ``label`` (a class name or a sequence label); >= 6, distinct."""
    split_label(label)  # validates
    return list(_CAPTIONS[label])


def caption_corpus() -> list[str]:
    """Every caption text the generator can emit (deterministic order), e.g. to fit a tokenizer."""
    return [text for label in all_labels() for text in _CAPTIONS[label]]


def label_for_caption(caption: str) -> str:
    """Recover the label of a generated caption (every caption belongs to exactly one label)."""
    try:
        return _CAPTION_TO_LABEL[caption]
    except KeyError:
        raise KeyError(f"not a synthetic AudioCaps caption: {caption!r}") from None
