"""Remote shard sources through the production path (url_to_fs -> glob -> PyFileSystem(FSSpecHandler) -> Ray Data).

hf:// runs the real `HfFileSystem` against `FakeHub`, a local HTTP stand-in for the three Hub endpoints it calls
(repo info, tree listing, file download with byte ranges): only the network is replaced. s3:// runs s3fs against
a moto server. The endpoints reach the filesystems through fsspec's config (`fsspec.config.conf`, the in-process
form of the FSSPEC_<PROTOCOL>_<KWARG> variables), so they are storage options of the filesystem object and travel
with it when Ray pickles it into its tasks: the S3 read needs nothing in the workers' environment.
"""

import json
import os
import pickle
import random
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import ray
from huggingface_hub import HfFileSystem
from huggingface_hub import constants as hf_constants

from af3dist.data.batching import window_features
from af3dist.data.pipeline import build_dataset
from af3dist.data.source import AUDIOCAPS_COLUMNS, read_references, split_files

REPO = "OpenSound/AudioCaps"
HUB_URL = f"hf://datasets/{REPO}"


# ---------------------------------------------------------------- a local stand-in for the Hub's HTTP API

class FakeHub:
    """Serves dataset repos {repo_id: {revision: {path_in_repo: bytes}}} the way huggingface.co answers
    `HfApi.repo_info`, `HfApi.list_repo_tree` (one page, in no particular order) and file downloads
    (`/resolve/`, with Range support). Every request is recorded as (method, path as sent, query, Range)."""

    def __init__(self, repos: dict[str, dict[str, dict[str, bytes]]]):
        self.repos = repos
        self.requests: list[tuple[str, str, dict, str | None]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub._handle(self, send_body=True)

            def do_HEAD(self):
                hub._handle(self, send_body=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def paths(self, kind: str) -> list[str]:
        """The paths, as sent (revisions quoted), of the recorded 'tree' listings or 'resolve' downloads."""
        return [p for _, p, _, _ in self.requests if f"/{kind}/" in p]

    @staticmethod
    def _reply(h, status, payload=b"", headers=(), send_body=True):
        if not isinstance(payload, bytes):
            payload = json.dumps(payload).encode()
            headers = [("Content-Type", "application/json"), *headers]
        h.send_response(status)
        for key, value in headers:
            h.send_header(key, value)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if send_body:
            h.wfile.write(payload)

    def _handle(self, h, send_body):
        url = urlsplit(h.path)
        query = parse_qs(url.query)
        self.requests.append((h.command, url.path, query, h.headers.get("Range")))
        parts = url.path.split("/")
        reply = lambda *a, **k: self._reply(h, *a, send_body=send_body, **k)  # noqa: E731
        not_found = lambda code: reply(404, {"error": code}, [("X-Error-Code", code)])  # noqa: E731
        if parts[1] == "api" and parts[2] == "datasets":
            # /api/datasets/<ns>/<name>[/revision/<rev> | /tree/<rev>[/<path>]]
            repo_id, op, rev = f"{parts[3]}/{parts[4]}", *(parts[5:7] + ["revision", "main"][len(parts[5:7]):])
            if repo_id not in self.repos:
                return not_found("RepoNotFound")
            files = self.repos[repo_id].get(unquote(rev))
            if files is None:
                return not_found("RevisionNotFound")
            if op == "revision":
                return reply(200, {"id": repo_id, "sha": "a" * 40, "private": False})
            if op == "tree":
                return self._tree(reply, not_found, files, unquote("/".join(parts[7:])),
                                  query.get("recursive", ["false"])[0] == "true")
        if parts[1] == "datasets" and len(parts) > 6 and parts[4] == "resolve":
            # /datasets/<ns>/<name>/resolve/<rev>/<path>
            data = self.repos.get(f"{parts[2]}/{parts[3]}", {}).get(unquote(parts[5]), {}).get(
                unquote("/".join(parts[6:])))
            if data is None:
                return not_found("EntryNotFound")
            if h.headers.get("Range"):
                start, _, end = h.headers["Range"].removeprefix("bytes=").partition("-")
                start, end = int(start), min(int(end) if end else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return reply(416)
                return reply(206, data[start:end + 1], [("Content-Range", f"bytes {start}-{end}/{len(data)}")])
            return reply(200, data)
        return reply(404)

    @staticmethod
    def _tree(reply, not_found, files, folder, recursive):
        prefix = f"{folder}/" if folder else ""
        entries: dict[str, dict] = {}
        for path, data in files.items():
            if not path.startswith(prefix):
                continue
            below = path[len(prefix):].split("/")
            for depth in range(1, len(below) if recursive else min(2, len(below))):
                sub = prefix + "/".join(below[:depth])
                entries[sub] = {"type": "directory", "oid": "d" * 40, "path": sub}
            if recursive or len(below) == 1:
                entries[path] = {"type": "file", "oid": "f" * 40, "size": len(data), "path": path}
        if not entries:
            return not_found("EntryNotFound")
        listing = list(entries.values())
        random.Random(len(listing)).shuffle(listing)  # the Hub promises no order
        return reply(200, listing)


def _fake_shards(split: str, n: int, size: int = 64) -> dict[str, bytes]:
    return {f"data/{split}-{i:05d}-of-{n:05d}.parquet": bytes([i]) * (size + i) for i in range(n)}


# The layout of OpenSound/AudioCaps on main, plus files the shard glob must not pick up.
MAIN = {
    ".gitattributes": b"*.parquet filter=lfs diff=lfs merge=lfs -text\n",
    "README.md": b"---\nconfigs: [default]\n---\n# AudioCaps\n",
    **_fake_shards("train", 7), **_fake_shards("validation", 1), **_fake_shards("test", 1),
    "data/train_extra-00000-of-00001.parquet": b"not a train shard",
    "data/old/train-00000-of-00001.parquet": b"one level too deep",
    "data/train-00000-of-00007.parquet.md5": b"not parquet",
}
# A pull-request ref with the same layout, resharded: tells apart which revision was listed and read.
PR = {"README.md": MAIN["README.md"], **_fake_shards("train", 8, size=200), **_fake_shards("validation", 2),
      **_fake_shards("test", 2)}
# The Hub's parquet-converter branch uses <config>/<split>/NNNN.parquet, not data/<split>-NNNNN-of-MMMMM.parquet.
CONVERTED = {"default/train/0000.parquet": b"converted", "default/validation/0000.parquet": b"converted"}


def _serve(monkeypatch, repos) -> FakeHub:
    hub = FakeHub(repos)
    monkeypatch.setitem(fsspec.config.conf, "hf", {"endpoint": hub.url})  # = FSSPEC_HF_ENDPOINT
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest turns the hub off; this hub is local
    return hub


@pytest.fixture
def fake_hub(monkeypatch):
    hub = _serve(monkeypatch, {REPO: {"main": MAIN, "refs/pr/3": PR, "refs/convert/parquet": CONVERTED},
                               "OpenSound/NoShards": {"main": {"README.md": b"# empty"}}})
    yield hub
    hub.close()
    HfFileSystem.clear_instance_cache()  # its listing and repo caches belong to this hub


# ---------------------------------------------------------------- hf:// resolution

def test_hub_url_resolves_to_hf_filesystem_and_lists_each_split(fake_hub):
    train = split_files(HUB_URL, "train")
    assert type(train.filesystem) is HfFileSystem and train.filesystem.endpoint == fake_hub.url
    assert train.paths == [f"datasets/{REPO}/data/train-{i:05d}-of-00007.parquet" for i in range(7)]
    assert split_files(HUB_URL, "validation").paths == [f"datasets/{REPO}/data/validation-00000-of-00001.parquet"]
    assert split_files(HUB_URL + "/", "test").paths == [f"datasets/{REPO}/data/test-00000-of-00001.parquet"]
    # Only listings so far, of data/ on main: nothing is downloaded to find the shards.
    assert fake_hub.paths("resolve") == []
    assert set(fake_hub.paths("tree")) <= {f"/api/datasets/{REPO}/tree/main/data", f"/api/datasets/{REPO}/tree/main"}

    arrow = train.arrow_filesystem()
    assert isinstance(arrow, pafs.PyFileSystem) and arrow.type_name == "py::fsspec+hf"
    assert isinstance(arrow.handler, pafs.FSSpecHandler) and arrow.handler.fs is train.filesystem
    # What Ray pickles into its read tasks: the endpoint and the listing travel with it.
    shipped = pickle.loads(pickle.dumps(arrow)).handler.fs
    assert type(shipped) is HfFileSystem and shipped.endpoint == fake_hub.url
    assert shipped.info(train.paths[3])["size"] == len(MAIN["data/train-00003-of-00007.parquet"])
    with arrow.open_input_file(train.paths[3]) as f:
        assert f.read() == MAIN["data/train-00003-of-00007.parquet"]
    assert fake_hub.paths("resolve") == [f"/datasets/{REPO}/resolve/main/data/train-00003-of-00007.parquet"]


@pytest.mark.parametrize("at, revision, files", [
    ("@main", "main", MAIN),
    ("@refs%2Fpr%2F3", "refs/pr/3", PR),
    ("@refs/pr/3", "refs/pr/3", PR),  # HfFileSystem also takes refs/pr/N and refs/convert/X unquoted
])
def test_revision_in_the_url(fake_hub, at, revision, files):
    quoted = revision.replace("/", "%2F")
    got = split_files(HUB_URL + at, "train")
    expected = sorted(p for p in files if re.fullmatch(r"data/train-\d{5}-of-\d{5}\.parquet", p))
    # The revision stays in the paths as written, so every later call (in any process) resolves it again.
    assert got.paths == [f"datasets/{REPO}{at}/{p}" for p in expected]
    assert f"/api/datasets/{REPO}/tree/{quoted}/data" in fake_hub.paths("tree")
    assert {p.split("/tree/")[1].split("/")[0] for p in fake_hub.paths("tree")} == {quoted}
    assert got.filesystem.cat_file(got.paths[-1]) == files[expected[-1]]
    assert fake_hub.paths("resolve") == [f"/datasets/{REPO}/resolve/{quoted}/{expected[-1]}"]


def test_no_shards_on_the_hub_is_a_clear_error(fake_hub):
    with pytest.raises(FileNotFoundError, match=r"no shards for split 'dev' in 'hf://datasets/OpenSound/AudioCaps' "
                                                r"\(looked for datasets/OpenSound/AudioCaps/data/dev-\*-of-\*\.parquet "
                                                r"on HfFileSystem\); expected the OpenSound/AudioCaps layout"):
        split_files(HUB_URL, "dev")
    with pytest.raises(FileNotFoundError, match="no shards for split 'train' in 'hf://datasets/OpenSound/NoShards'"):
        split_files("hf://datasets/OpenSound/NoShards", "train")  # no data/ folder at all
    # The parquet-converter branch has another layout, so the revision is found but no shard is.
    with pytest.raises(FileNotFoundError, match=r"looked for datasets/OpenSound/AudioCaps@refs%2Fconvert%2Fparquet/"
                                                r"data/train-\*-of-\*\.parquet"):
        split_files(HUB_URL + "@refs%2Fconvert%2Fparquet", "train")
    assert f"/api/datasets/{REPO}/tree/refs%2Fconvert%2Fparquet/data" in fake_hub.paths("tree")
    # A missing repo or revision fails in HfFileSystem itself, still as FileNotFoundError.
    with pytest.raises(FileNotFoundError, match="repository not found"):
        split_files("hf://datasets/OpenSound/AudioCapz", "train")
    with pytest.raises(FileNotFoundError, match="revision not found"):
        split_files(HUB_URL + "@v9", "train")


MISSING_LOCAL = "AttributeError: module 'fsspec.implementations' has no attribute 'local'"


def test_arrow_filesystem_in_a_fresh_process(fake_hub):
    """The test session imported fsspec.implementations.local long ago (local paths); a real hf:// run may not."""
    code = ("from af3dist.data.source import split_files\n"
            f"print(type(split_files({HUB_URL!r}, 'train').arrow_filesystem()).__name__)")
    # The endpoint as an operator would set it for a whole process: fsspec reads FSSPEC_HF_ENDPOINT at import.
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "FSSPEC_HF_ENDPOINT": fake_hub.url}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=Path(__file__).parents[1],
                          capture_output=True, text=True, timeout=120)
    if MISSING_LOCAL in done.stderr:
        raise AttributeError(MISSING_LOCAL)
    assert done.returncode == 0, done.stderr[-1500:]
    assert done.stdout.strip() == "PyFileSystem"


# ---------------------------------------------------------------- s3:// against moto

BUCKET = "audiocaps-test"


@pytest.fixture(scope="module")
def moto_endpoint():
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    fsspec.get_filesystem_class("s3").clear_instance_cache()  # clients of a server that is gone


@pytest.fixture(scope="module")
def s3_options(moto_endpoint, synthetic_dir):
    """The synthetic shards uploaded to s3://audiocaps-test/audiocaps/data/ on the moto server."""
    import s3fs

    options = {"endpoint_url": moto_endpoint, "key": "testing", "secret": "testing"}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    for path in sorted(Path(synthetic_dir, "data").glob("*.parquet")):
        fs.put_file(str(path), f"{BUCKET}/audiocaps/data/{path.name}")
    return options


@pytest.fixture
def s3_source(s3_options, monkeypatch):
    # = FSSPEC_S3_ENDPOINT_URL / FSSPEC_S3_KEY / FSSPEC_S3_SECRET, without a restart of the session's Ray
    monkeypatch.setitem(fsspec.config.conf, "s3", dict(s3_options))
    return f"s3://{BUCKET}/audiocaps"


def _local_rows(synthetic_dir, split, columns) -> list[dict]:
    return pa.concat_tables([pq.read_table(p, columns=columns)
                             for p in split_files(synthetic_dir, split).paths]).to_pylist()


def test_s3_listing_and_what_the_workers_get(s3_source, s3_options):
    import s3fs

    files = split_files(s3_source, "train")
    assert isinstance(files.filesystem, s3fs.S3FileSystem)
    assert files.paths == [f"{BUCKET}/audiocaps/data/train-0000{i}-of-00002.parquet" for i in range(2)]
    assert split_files(s3_source, "validation").paths[0].endswith("/data/validation-00000-of-00002.parquet")
    arrow = files.arrow_filesystem()
    assert isinstance(arrow, pafs.PyFileSystem) and isinstance(arrow.handler, pafs.FSSpecHandler)
    shipped = pickle.loads(pickle.dumps(arrow)).handler.fs
    assert {k: shipped.storage_options.get(k) for k in s3_options} == s3_options


@pytest.mark.usefixtures("ray_local")
def test_s3_source_end_to_end(tiny_config, s3_source, synthetic_dir):
    cfg = tiny_config.data.model_copy(update={"source": s3_source})
    rows = build_dataset(cfg, tiny_config.model.name_or_path, "train").take_all()
    local = _local_rows(synthetic_dir, "train", ["audiocap_id", "caption"])
    assert sorted(r["id"] for r in rows) == sorted(str(r["audiocap_id"]) for r in local)
    captions = {str(r["audiocap_id"]): r["caption"].strip() for r in local}
    assert all(r["caption"] == captions[r["id"]] for r in rows)
    assert all(window_features(r).shape == (r["num_windows"], 128, 3000) for r in rows)

    refs = read_references(s3_source, "validation")
    assert refs == read_references(synthetic_dir, "validation")
    assert len(refs) == 6 and all(len(c["references"]) == 5 for c in refs.values())


# ---------------------------------------------------------------- hf:// end to end through Ray Data

@pytest.mark.usefixtures("ray_local")
def test_hub_source_end_to_end_through_ray_data(monkeypatch, tiny_config, synthetic_dir):
    """The synthetic shards, served only on refs/pr/3, read by Ray Data's tasks over HTTP.

    conftest sets HF_HUB_OFFLINE=1 before the session's Ray starts, so its workers refuse every hub request,
    this local hub's included, and a worker's environment is fixed when it starts. Rather than restart the
    shared Ray, `read_split` runs unchanged in a task whose runtime_env turns the hub back on and sets the
    endpoint the way an operator would (FSSPEC_HF_ENDPOINT); the Ray Data tasks it starts inherit that
    runtime_env. Rows come back only if every one of them resolved the revision and reached this hub.
    """
    shards = {f"data/{p.name}": p.read_bytes() for p in Path(synthetic_dir, "data").glob("*.parquet")}
    hub = _serve(monkeypatch, {REPO: {"main": {"README.md": b"# nothing here"}, "refs/pr/3": shards}})
    try:
        source = HUB_URL + "@refs%2Fpr%2F3"
        cfg = tiny_config.data.model_copy(update={"source": source})

        def read_split_rows(cfg, split: str) -> list[dict]:  # local, so pickled by value: workers lack tests/
            from af3dist.data.pipeline import read_split

            return [dict(r) for r in read_split(cfg, split).take_all()]

        online = {"env_vars": {"HF_HUB_OFFLINE": "0", "FSSPEC_HF_ENDPOINT": hub.url}}
        task = ray.remote(read_split_rows).options(num_cpus=0, runtime_env=online, max_retries=0)
        rows = ray.get(task.remote(cfg, "train"), timeout=300)
        key = lambda r: r["audiocap_id"]  # noqa: E731
        assert sorted(rows, key=key) == sorted(_local_rows(synthetic_dir, "train", AUDIOCAPS_COLUMNS), key=key)
        downloads = [(p, rng) for _, p, _, rng in hub.requests if "/resolve/" in p]
        assert {p.removeprefix(f"/datasets/{REPO}/resolve/refs%2Fpr%2F3/") for p, _ in downloads} == {
            p for p in shards if p.startswith("data/train-")}
        assert any(rng for _, rng in downloads)  # parquet footers are read as byte ranges

        refs = read_references(source, "validation")
        assert refs == read_references(synthetic_dir, "validation")
        assert len(refs) == 6 and all(len(c["references"]) == 5 for c in refs.values())
    finally:
        hub.close()
        HfFileSystem.clear_instance_cache()
