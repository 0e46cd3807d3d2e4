"""The embedded default: everything a laptop with no GPU and no network needs to run af3dist end to end.

- `captions`: the synthetic AudioCaps vocabulary (sound classes, captions, sequence labels);
- `sounds`: procedural sound events and clips of a label;
- `encoding`: clips as whole, deterministic audio files (WAV, FLAC, MP3, Ogg Vorbis);
- `plan`: one `ClipSpec` per clip of a split (formats, rates, lengths, ids), fixed values for benchmarks;
- `audiocaps`: the parquet shards, in exactly the hub layout of OpenSound/AudioCaps;
- `tiny_model`: a tiny AF3 (the real transformers classes, small sizes) and its tokenizer, built locally;
- `assets`: building those on first use (and rebuilding what changed), shared by every job.
Nothing in the pipeline imports this package: a real run loads the hub checkpoint and dataset through the
same code that loads these stand-ins.
"""
