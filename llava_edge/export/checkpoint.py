"""Load a LLaVA checkpoint from disk into one in-memory form, whatever layout it was saved in.

Two layouts exist in the wild: llava-hf (`LlavaForConditionalGeneration`, or
`LlavaNextForConditionalGeneration` for LLaVA-NeXT anyres; decoder LLaMA, Mistral, Qwen2 or Phi-3; tower
CLIP or SigLIP) and the original LLaVA repo (`LlavaLlamaForCausalLM` + a separate CLIP directory). Both
become a transformers LLaVA model plus the preprocessing/prompt facts the package needs. We load state dicts
ourselves rather than through `from_pretrained` because transformers versions disagree on key names (hub files say
`vision_tower.vision_model.*`, 5.x writes `vision_tower.*`, 4.57 silently re-initialises the tower when
reading the latter): here every layout maps to one set of names and anything missing is an error.
Never downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import LlavaEdgeError
from ..package import VisionConfig
from .graphs import unfuse_projections


class CheckpointError(LlavaEdgeError):
    """The directory is not a loadable LLaVA checkpoint; the message names the missing piece."""


@dataclass
class LoadedCheckpoint:
    model: Any  # LlavaForConditionalGeneration, eval mode, float32
    layout: str  # "llava-hf" or "original"
    path: Path
    tokenizer: Any  # tokenizers.Tokenizer, with the image token registered
    image_token: str
    image_token_id: int
    vision: VisionConfig
    chat_template: str
    eos_token_ids: list[int]
    bos_token_id: int | None
    pad_token_id: int
    projector: str  # "mlp2x_gelu" / "linear"
    family: dict[str, str] = field(default_factory=lambda: {"model": "llava", "decoder": "llama", "vision": "clip"})
    chat_template_source: str = "llava-edge default"
    max_context: int = 0  # the package's context: max_position_embeddings unless capped (context_cap)
    context_cap: str | None = None  # why max_context is below max_position_embeddings
    # load_checkpoint(lazy_decoder=True): the decoder's tensors (layers, final norm, lm_head) by model key,
    # left in their files; model holds them on the meta device (export/lazy.py reads them one at a time)
    deferred: dict[str, "TensorRef | torch.Tensor"] = field(default_factory=dict)


TEXT_FAMILIES = ("llama", "mistral", "qwen2", "phi3")
VISION_FAMILIES = {"clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip"}


def context_limit(text_config) -> tuple[int, str | None]:
    """The context the exported graphs reproduce transformers over, and why it is below the config's.

    - A sliding attention window (Mistral v0.1, Phi-3-mini-4k): our graphs attend to the whole cache, which
      equals transformers' windowed attention as long as no query is more than `sliding_window` keys
      after the first; the package's context is capped at the window instead of emulating it.
    - longrope / dynamic rotary scaling (Phi-3 128k, Phi-3.5): transformers switches rotary tables once a
      sequence outgrows original_max_position_embeddings; the graphs hold the table used below that, so the
      context is capped there."""
    limit, reasons = int(text_config.max_position_embeddings), []
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if window and (layer_types is None or "sliding_attention" in layer_types) and window < limit:
        limit = int(window)
        reasons.append(f"sliding_window={window}: full attention equals the window only up to {window} tokens")
    rope = getattr(text_config, "rope_parameters", None) or {}
    original = (rope.get("original_max_position_embeddings")
                or getattr(text_config, "original_max_position_embeddings", None))
    if rope.get("rope_type") in ("longrope", "dynamic") and original and original < limit:
        limit = int(original)
        reasons.append(f"{rope['rope_type']} rotary scaling: the graphs hold the rotary table transformers uses "
                       f"up to original_max_position_embeddings={original}")
    return limit, ("; ".join(reasons) or None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing {path.name} in {path.parent}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def detect_layout(path: Path) -> str:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = _read_json(path / "config.json")
    archs = config.get("architectures") or []
    if "mm_vision_tower" in config or any("LlavaLlama" in a for a in archs):
        return "original"
    if config.get("model_type") in ("llava", "llava_next") and "vision_config" in config:
        return "llava-hf"
    if "LlavaForConditionalGeneration" in archs or "LlavaNextForConditionalGeneration" in archs:
        return "llava-hf"
    kind = config.get("model_type") or (archs[0] if archs else "unknown")
    raise CheckpointError(
        f"{path} is not a LLaVA checkpoint (config.json says model_type/architecture '{kind}'); "
        "expected a llava-hf LlavaForConditionalGeneration or an original LlavaLlamaForCausalLM directory"
    )


READ_WINDOW = 256 << 20  # bytes of a weights file read between reopenings (see _load_state_dict)
DECODER_PREFIXES = ("model.language_model.layers.", "model.language_model.norm.", "lm_head.")


def is_decoder_key(key: str) -> bool:
    """A model key of the language model's layers, final norm or lm_head: what a lazy load leaves on disk."""
    return key.startswith(DECODER_PREFIXES)


@dataclass(frozen=True)
class TensorRef:
    """One tensor left in its safetensors file, read on demand: the file is opened for that tensor and
    closed again, so neither the tensor nor the mapped pages stay in memory after the caller drops it."""

    file: Path
    key: str
    shape: tuple[int, ...]

    def read(self, dtype: torch.dtype | None = None, rows: tuple[int, int] | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file), framework="pt") as st:
            t = st.get_slice(self.key)[rows[0]:rows[1]] if rows else st.get_tensor(self.key)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _load_state_dict(path: Path, dtype: torch.dtype | None = None,
                     defer: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor | TensorRef]:
    """Single-file or sharded safetensors (preferred), else pytorch_model*.bin (weights only).

    Tensors are read one at a time (safetensors' mmap) and floating ones converted to ``dtype`` as they
    come: converting the whole model afterwards would hold the file's copy and the converted one at
    once (a 7B fp16 checkpoint loaded as fp32: 14 + 28 GB instead of 28). Keys for which ``defer`` is
    true are not read: a safetensors tensor becomes a TensorRef, a .bin one stays the file's mapped
    tensor, unconverted."""
    from safetensors import SafetensorError, safe_open

    def convert(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def deferred(k: str) -> bool:
        return defer is not None and defer(k)

    def read(f: Path, state: dict[str, torch.Tensor]) -> None:
        # The file is mapped, and the pages read stay in this process's RSS until it is unmapped:
        # reopening it every READ_WINDOW bytes keeps that at one window, not the whole file.
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = []
                for k in st.keys():
                    if deferred(k):
                        state[k] = TensorRef(f, k, tuple(st.get_slice(k).get_shape()))
                    else:
                        keys.append(k)
            while keys:
                with safe_open(str(f), framework="pt") as st:
                    read_bytes = 0
                    while keys and read_bytes < READ_WINDOW:
                        t = st.get_tensor(keys[0])
                        read_bytes += t.numel() * t.element_size()
                        state[keys.pop(0)] = convert(t)
                        del t
        except (SafetensorError, OSError, RuntimeError) as e:  # truncated or not a safetensors file
            raise CheckpointError(f"cannot read weights {f}: {e}") from None

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(_read_json(index)["weight_map"].values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} is incomplete: missing shard(s) {', '.join(missing)}")
        state: dict[str, torch.Tensor] = {}
        for f in files:
            read(path / f, state)
        return state
    singles = sorted(path.glob("*.safetensors"))
    if singles:
        state = {}
        for f in singles:
            read(f, state)
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            for k, v in torch.load(f, map_location="cpu", weights_only=True, mmap=True).items():
                state[k] = v if deferred(k) else convert(v)
        return state
    raise CheckpointError(f"no weights in {path}: expected model.safetensors (or shards) or pytorch_model.bin")


def _normalize_hf_key(key: str) -> str:
    """Map every known llava-hf key spelling to LlavaForConditionalGeneration's parameter names."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("model.vision_tower.vision_model.", "model.vision_tower."),
        ("vision_tower.vision_model.", "model.vision_tower."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def weights_bytes(path: str | Path) -> int:
    """Bytes of weight files on disk (safetensors or .bin), for memory planning before loading."""
    p = Path(path)
    return sum(f.stat().st_size for pat in ("*.safetensors", "pytorch_model*.bin") for f in p.glob(pat))


def _strict_load(model: torch.nn.Module, state: dict[str, torch.Tensor | TensorRef], where: Path,
                 lazy_decoder: bool = False) -> dict[str, torch.Tensor | TensorRef]:
    """Check names and shapes, assign the weights; with lazy_decoder the decoder's entries (is_decoder_key)
    are not assigned but returned (their parameters stay on the meta device)."""
    expected = model.state_dict()
    # Buffers that are recomputed (rotary inv_freq, CLIP position ids) are not required on disk.
    optional = {k for k in expected if k.endswith(("inv_freq", "position_ids"))}
    missing = sorted(set(expected) - set(state) - optional)
    if missing and "lm_head.weight" in missing and getattr(model.config, "tie_word_embeddings", False):
        state["lm_head.weight"] = state["model.language_model.embed_tokens.weight"]
        missing.remove("lm_head.weight")
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {where} is missing weights: {shown}")
    for k, v in state.items():
        if k in expected and expected[k].shape != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint {where}: weight {k} has shape {tuple(v.shape)}, config implies {tuple(expected[k].shape)}"
            )
    deferred = {k: v for k, v in state.items() if k in expected and lazy_decoder and is_decoder_key(k)}
    model.load_state_dict({k: v for k, v in state.items() if k in expected and k not in deferred}, strict=False,
                          assign=True)
    _materialize_buffers(model, keep_meta=set(deferred))
    return deferred


def _materialize_buffers(model: torch.nn.Module, keep_meta: set[str] = frozenset()) -> None:
    """The model was built on the meta device (no memory for weights we are about to replace); its
    computed buffers (rotary inv_freq, CLIP position ids) are rebuilt here from the module's config.
    Parameters named in keep_meta (a lazy load's decoder) may stay on the meta device."""
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        fresh = type(module)(module.config)
        for name in meta:
            setattr(module, name, getattr(fresh, name))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta and n not in keep_meta]
    if left:
        raise CheckpointError(f"weights left uninitialised after loading: {', '.join(left[:5])}")


def _vision_from_processor(pre: dict[str, Any], image_size: int, patch_size: int, layer, strategy: str,
                           pad: bool, has_cls: bool = True) -> VisionConfig:
    size = pre.get("size", {"shortest_edge": image_size})
    shortest = size.get("shortest_edge") if isinstance(size, dict) else int(size)
    resize = "shortest_edge"
    if shortest is None:  # {"height", "width"}: SigLIP's processor resizes straight to the square
        shortest = min(size.get("height", image_size), size.get("width", image_size))
        resize = "square"
        if size.get("height") != size.get("width") or shortest != image_size:
            raise CheckpointError(f"processor size {size} is not the vision tower's {image_size}x{image_size} square")
    crop = pre.get("crop_size", {"height": image_size, "width": image_size})
    crop_size = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
    if crop_size != image_size:
        raise CheckpointError(f"processor crop size {crop_size} differs from the vision tower's {image_size}")
    # CLIP's CLS token is dropped by "default"; a tower without one (SigLIP) loses its first patch instead
    n = (image_size // patch_size) ** 2 + int(has_cls) - int(strategy == "default")
    return VisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        shortest_edge=int(shortest),
        image_mean=[float(x) for x in pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])],
        image_std=[float(x) for x in pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])],
        rescale_factor=float(pre.get("rescale_factor", 1 / 255)),
        resample=int(pre.get("resample", 3)),
        do_center_crop=bool(pre.get("do_center_crop", resize == "shortest_edge")),
        pad_to_square=pad,
        num_image_tokens=n,
        vision_feature_layer=layer,
        select_strategy=strategy,
        resize=resize,
    )


def _load_tokenizer(path: Path, image_token: str, add_image_token: bool):
    from tokenizers import AddedToken, Tokenizer

    tj = path / "tokenizer.json"
    if tj.is_file():
        tok = Tokenizer.from_file(str(tj))
    else:
        try:  # e.g. only a sentencepiece tokenizer.model: let transformers convert it, offline
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(path, local_files_only=True, use_fast=True).backend_tokenizer
        except Exception as e:
            raise CheckpointError(f"no usable tokenizer in {path} (tokenizer.json or tokenizer.model): {e}") from None
    if add_image_token and tok.token_to_id(image_token) is None:
        tok.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
    if tok.token_to_id(image_token) is None:
        raise CheckpointError(f"tokenizer in {path} has no image token {image_token!r}")
    return tok


def _special_ids(path: Path, tok, config: dict[str, Any]) -> tuple[int | None, list[int], int]:
    tcfg = {}
    if (path / "tokenizer_config.json").is_file():
        tcfg = _read_json(path / "tokenizer_config.json")

    def tok_id(name: str, default: str | None) -> int | None:
        val = tcfg.get(name, default)
        if isinstance(val, dict):
            val = val.get("content")
        return tok.token_to_id(val) if val else None

    bos = tok_id("bos_token", "<s>")
    eos = tok_id("eos_token", "</s>")
    eos_cfg = config.get("eos_token_id")
    eos_ids = [eos] if eos is not None else []
    for e in eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]:
        if isinstance(e, int) and e not in eos_ids:
            eos_ids.append(e)
    if not eos_ids:
        raise CheckpointError(f"cannot tell the end-of-sequence token of {path}")
    pad = tok_id("pad_token", None)
    if pad is None:
        pad = tok_id("unk_token", "<unk>") or eos_ids[0]
    return bos, eos_ids, pad


def load_checkpoint(path: str | Path, vision_tower: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, lazy_decoder: bool = False) -> LoadedCheckpoint:
    """Read a LLaVA checkpoint directory (either layout) into a LlavaForConditionalGeneration of `dtype`
    (float32 by default: the reference for verification).

    lazy_decoder: only the vision tower, projector and embedding table are read; the decoder's layers,
    final norm and lm_head stay in the files (LoadedCheckpoint.deferred, parameters on the meta device),
    for export/lazy.py to read a tensor at a time. Needs safetensors for O(one tensor) memory (.bin
    files are memory-mapped)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path).expanduser().resolve()
    layout = detect_layout(path)
    if layout == "llava-hf":
        return _load_llava_hf(path, dtype, lazy_decoder)
    return _load_original(path, vision_tower, dtype, lazy_decoder)


def _checkpoint_chat_template(path: Path, proc: dict[str, Any]) -> str | None:
    """The checkpoint's own Jinja chat template, wherever transformers saved it (4.x or 5.x)."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if isinstance(proc.get("chat_template"), str):
        return proc["chat_template"]
    if (path / "chat_template.json").is_file():
        return _read_json(path / "chat_template.json").get("chat_template")
    if (path / "tokenizer_config.json").is_file():
        t = _read_json(path / "tokenizer_config.json").get("chat_template")
        if isinstance(t, list):  # named templates: the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def resolve_chat_template(jinja: str | None, decoder: str, image_token: str, bos_token: str | None) -> tuple[str, str]:
    """(renderer name, how it was chosen). The runtime renders prompts with our own renderers
    (runtime/prompt.py), never Jinja: here, where transformers is available, the checkpoint's template is
    recognised by its markers and then rendered with transformers' Jinja on probe conversations (one
    turn; two turns with an answer) and compared with our renderer character for character. Only an
    exact match is used; otherwise the family's default renderer, and the manifest says so."""
    from ..runtime import prompt as prompts

    fallback = prompts.DEFAULT_TEMPLATE[decoder]
    if not jinja:
        return fallback, f"no chat_template in the checkpoint: {decoder} default '{fallback}'"
    names = prompts.template_candidates(jinja)
    if not names:
        return fallback, f"checkpoint chat_template not recognised: {decoder} default '{fallback}'"
    for name in names:
        if all(_renders_as(jinja, name, turns, image_token, bos_token) for turns in prompts.PROBE_CONVERSATIONS):
            return name, f"checkpoint chat_template, rendered as '{name}' (equal on probe conversations)"
    return fallback, (f"checkpoint chat_template looks like '{names[0]}' but renders differently: "
                      f"{decoder} default '{fallback}'")


def _renders_as(jinja: str, name: str, turns, image_token: str, bos_token: str | None) -> bool:
    from transformers.utils.chat_template_utils import render_jinja_template

    from ..runtime import prompt as prompts

    rendered, _ = render_jinja_template(conversations=[prompts.to_messages(turns)], chat_template=jinja,
                                        add_generation_prompt=True, bos_token=bos_token or "", eos_token="")
    text = rendered[0]
    if bos_token and text.startswith(bos_token):  # the tokenizer adds bos; our renderers leave it out
        text = text[len(bos_token):]
    return text == prompts.render(name, turns, image_token, 1)


def _load_llava_hf(path: Path, dtype: torch.dtype, lazy_decoder: bool = False) -> LoadedCheckpoint:
    from transformers import (LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                              LlavaNextForConditionalGeneration)

    raw = _read_json(path / "config.json")
    vt = raw.get("vision_config", {}).get("model_type", "clip_vision_model")
    if vt not in VISION_FAMILIES:
        raise CheckpointError(f"vision tower type {vt!r} is not supported (CLIP or SigLIP towers)")
    tt = raw.get("text_config", {}).get("model_type", "llama")
    if tt not in TEXT_FAMILIES:
        raise CheckpointError(f"language model type {tt!r} is not supported ({', '.join(TEXT_FAMILIES)})")
    next_ = (raw.get("model_type") == "llava_next"
             or "LlavaNextForConditionalGeneration" in (raw.get("architectures") or []))
    config = (LlavaNextConfig if next_ else LlavaConfig).from_pretrained(path, local_files_only=True)
    if next_ and VISION_FAMILIES[vt] != "clip":
        raise CheckpointError("LLaVA-NeXT with a non-CLIP tower is not supported")
    defer = (lambda k: is_decoder_key(_normalize_hf_key(k))) if lazy_decoder else None
    state = {_normalize_hf_key(k): v for k, v in _load_state_dict(path, dtype, defer).items()}
    with torch.device("meta"):  # no memory until the real weights are assigned
        model = (LlavaNextForConditionalGeneration if next_ else LlavaForConditionalGeneration)(config)
    deferred = _strict_load(model, state, path, lazy_decoder)
    model = model.to(dtype).eval()
    unfuse_projections(model)  # Phi-3: q/k/v and gate/up as separate Linears, like every other family

    proc = _read_json(path / "processor_config.json") if (path / "processor_config.json").is_file() else {}
    # transformers 5 nests the image processor in processor_config.json; 4.x wrote its own file.
    if (path / "preprocessor_config.json").is_file():
        pre = _read_json(path / "preprocessor_config.json")
    elif isinstance(proc.get("image_processor"), dict):
        pre = proc["image_processor"]
    else:
        raise CheckpointError(f"missing preprocessor_config.json in {path} (image preprocessing settings)")
    strategy = config.vision_feature_select_strategy
    vc = config.vision_config
    has_cls = VISION_FAMILIES[vt] == "clip"
    # "do_pad" is LlavaImageProcessor's pad-to-square (LLaVA-1.5's 'pad' aspect ratio); NeXT's do_pad
    # means something else (padding the tile batch).
    vision = _vision_from_processor(pre, vc.image_size, vc.patch_size, config.vision_feature_layer, strategy,
                                    bool(pre.get("do_pad", False)) and not next_, has_cls)
    extra = int(proc.get("num_additional_image_tokens", int(has_cls)))
    if extra != int(has_cls):
        raise CheckpointError(
            f"{path}/processor_config.json sets num_additional_image_tokens={extra}; a {VISION_FAMILIES[vt]} "
            f"tower needs {int(has_cls)} (its CLS tokens) or image tokens and features disagree"
        )
    if next_:
        pinpoints = [list(map(int, p)) for p in (pre.get("image_grid_pinpoints") or config.image_grid_pinpoints)]
        if pinpoints != [list(map(int, p)) for p in config.image_grid_pinpoints]:
            raise CheckpointError(f"{path}: the processor's image_grid_pinpoints differ from config.json's")
        newline = model.model.image_newline.detach().float().tolist()
        vision.anyres = {"grid_pinpoints": pinpoints, "image_newline": newline}
    image_token = proc.get("image_token", "<image>")
    tok = _load_tokenizer(path, image_token, add_image_token=False)
    if tok.token_to_id(image_token) != config.image_token_id:
        raise CheckpointError(
            f"tokenizer maps {image_token!r} to {tok.token_to_id(image_token)} but config.json says "
            f"image_token_id={config.image_token_id}"
        )
    bos, eos, pad = _special_ids(path, tok, raw.get("text_config", {}))
    template, template_source = resolve_chat_template(
        _checkpoint_chat_template(path, proc), tt, image_token, tok.id_to_token(bos) if bos is not None else None)
    max_context, cap = context_limit(config.text_config)
    return LoadedCheckpoint(
        model=model, layout="llava-hf", path=path, tokenizer=tok, image_token=image_token,
        image_token_id=config.image_token_id, vision=vision, chat_template=template,
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, projector="mlp2x_gelu",
        family={"model": "llava_next" if next_ else "llava", "decoder": tt, "vision": VISION_FAMILIES[vt]},
        chat_template_source=template_source, max_context=max_context, context_cap=cap, deferred=deferred,
    )


def _resolve_vision_tower(path: Path, name: str, override: str | Path | None) -> Path:
    candidates = [Path(override)] if override else []
    candidates += [Path(name).expanduser(), path / name, path / Path(name).name]
    for c in candidates:
        if (c / "config.json").is_file():
            return c.resolve()
    raise CheckpointError(
        f"mm_vision_tower {name!r} is not a local CLIP directory (looked in {', '.join(str(c) for c in candidates)}); "
        "put the CLIP vision model next to the checkpoint or pass --vision-tower DIR (nothing is downloaded)"
    )


def _original_key(key: str, projector: str) -> str | None:
    """LlavaForConditionalGeneration's name for a key of an original LLaVA checkpoint (None: not used)."""
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector.") :]
        if projector == "mlp2x_gelu":
            rest = rest.replace("0.", "linear_1.", 1) if rest.startswith("0.") else rest.replace("2.", "linear_2.", 1)
        return "model.multi_modal_projector." + rest
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "model.vision_tower." + key[len("model.vision_tower.vision_tower.vision_model.") :]
    if key.startswith("model."):
        return "model.language_model." + key[len("model.") :]
    if key.startswith("lm_head."):
        return key
    return None


def _load_original(path: Path, vision_tower: str | Path | None, dtype: torch.dtype,
                   lazy_decoder: bool = False) -> LoadedCheckpoint:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    raw = _read_json(path / "config.json")
    if raw.get("mm_use_im_start_end"):
        raise CheckpointError("checkpoints with mm_use_im_start_end=true (LLaVA v0) are not supported")
    projector = raw.get("mm_projector_type", "linear")
    if projector not in ("linear", "mlp2x_gelu"):
        raise CheckpointError(f"mm_projector_type {projector!r} is not supported (linear or mlp2x_gelu)")
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise CheckpointError(f"mm_vision_select_feature {select!r} is not supported")
    strategy = "default" if select == "patch" else "full"
    layer = int(raw.get("mm_vision_select_layer", -2))

    clip_dir = _resolve_vision_tower(path, raw.get("mm_vision_tower", ""), vision_tower)
    clip_raw = _read_json(clip_dir / "config.json")
    if clip_raw.get("model_type") == "clip":
        vcfg = CLIPVisionConfig(**clip_raw["vision_config"])
    elif clip_raw.get("model_type") == "clip_vision_model":
        vcfg = CLIPVisionConfig.from_pretrained(clip_dir, local_files_only=True)
    else:
        raise CheckpointError(f"{clip_dir} is not a CLIP model (model_type {clip_raw.get('model_type')!r})")

    tok = _load_tokenizer(path, "<image>", add_image_token=True)
    image_token_id = tok.token_to_id("<image>")
    keys = {k for k in LlamaConfig().to_dict()} | {"head_dim", "rope_theta", "rope_scaling"}
    text_kwargs = {k: v for k, v in raw.items() if k in keys and k not in ("architectures", "model_type")}
    tcfg = LlamaConfig(**text_kwargs)
    vocab = tcfg.vocab_size
    if image_token_id < vocab:
        raise CheckpointError(f"tokenizer's <image> id {image_token_id} collides with the vocabulary ({vocab})")
    config = LlavaConfig(
        vision_config=vcfg, text_config=tcfg, image_token_id=image_token_id, vision_feature_layer=layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    defer = (lambda k: is_decoder_key(_original_key(k, projector) or "")) if lazy_decoder else None
    state_in = _load_state_dict(path, dtype, defer)
    meta = torch.device("meta")
    with meta:
        model = LlavaForConditionalGeneration(config)
    # The original model splices image features where input_ids hold -200 and never embeds that id;
    # we give <image> its own (zero) embedding row so ids stay valid. lm_head keeps the real vocab,
    # so the image token can never be generated.
    model.model.language_model.embed_tokens = torch.nn.Embedding(image_token_id + 1, tcfg.hidden_size, device=meta)
    if projector == "linear":
        model.model.multi_modal_projector = torch.nn.Linear(vcfg.hidden_size, tcfg.hidden_size, device=meta)

    state: dict[str, torch.Tensor | TensorRef] = {}
    tower_in_ckpt = False
    for k, v in state_in.items():
        name = _original_key(k, projector)
        if name is not None:
            state[name] = v
            tower_in_ckpt |= k.startswith("model.vision_tower.vision_tower.vision_model.")
    if not tower_in_ckpt:
        for k, v in _load_state_dict(clip_dir, dtype).items():
            if k.startswith("vision_model."):  # hub CLIPModel / CLIPVisionModel files
                state["model.vision_tower." + k[len("vision_model.") :]] = v
            elif k.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")):  # transformers 5
                state["model.vision_tower." + k] = v
    emb_key = "model.language_model.embed_tokens.weight"
    if emb_key in state and state[emb_key].shape[0] == vocab:
        state[emb_key] = torch.cat([state[emb_key],
                                    state[emb_key].new_zeros(image_token_id + 1 - vocab, tcfg.hidden_size)])
    deferred = _strict_load(model, state, path, lazy_decoder)
    model = model.to(dtype).eval()

    pre = {}
    for where in (clip_dir / "preprocessor_config.json", clip_dir / "processor_config.json"):
        if where.is_file():
            pre = _read_json(where)
            pre = pre.get("image_processor", pre)
            break
    vision = _vision_from_processor(pre, vcfg.image_size, vcfg.patch_size, layer, strategy,
                                    raw.get("image_aspect_ratio", "square") == "pad")
    bos, eos, pad = _special_ids(path, tok, raw)
    return LoadedCheckpoint(
        model=model, layout="original", path=path, tokenizer=tok, image_token="<image>",
        image_token_id=image_token_id, vision=vision, chat_template="llava_v1",
        eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad, projector=projector,
        chat_template_source="original LLaVA layout: conv_vicuna_v1", max_context=tcfg.max_position_embeddings,
        deferred=deferred,
    )
