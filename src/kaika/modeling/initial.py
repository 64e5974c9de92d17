"""Adapters whose initialisation moves part of the base into them: ``--lora-init pissa`` and ``olora``.

PiSSA puts the top-r singular directions of each adapted weight W into the adapter (B₀A₀) and leaves
the base holding the residual W − scale·B₀A₀; OLoRA does the same from a QR factorisation. The trained
model is therefore *residual base + adapter*, and an adapter saved as it is would only be right on a
base nobody else has. kaika saves what every loader expects instead: peft's conversion
(``save_pretrained(path_initial_model_for_weight_conversion=…)``) writes the plain LoRA
ΔW = scale·(BA − B₀A₀) of rank 2r, which applies to the unmodified base — generation, merge, GGUF
export and serving need nothing special.

The run keeps the initial adapter in ``lora_init/`` (:data:`INIT_DIR`): the conversion reads it, and
``--resume`` checks that this machine recomputes the same initialisation (the checkpoint's adapter
belongs to that residual base, which is never saved).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from kaika.atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, STAGE_PREFIX
from kaika.errors import KaikaError

log = logging.getLogger(__name__)

INIT_DIR = "lora_init"
INITIAL_ATTR = "kaika_initial_adapter"  # set on the PeftModel by kaika.modeling.lora.apply_lora


def initial_of(peft_model) -> dict[str, torch.Tensor] | None:
    """The initial adapter kept by :func:`kaika.modeling.lora.apply_lora`, or None (nothing to convert)."""
    return peft_model.__dict__.get(INITIAL_ATTR)


def record_initial(out: Path, peft_model, resume: bool) -> None:
    """A fresh run writes its initial adapter to ``out/lora_init``; a resumed one checks that the
    initialisation computed here is that one, bit for bit."""
    from safetensors.torch import load_file, save_file

    initial = initial_of(peft_model)
    where = out / INIT_DIR
    if resume and (initial is None) == (where / ADAPTER_CONFIG).is_file():
        recorded = recorded_init(where)
        raise KaikaError(
            f"--resume: the run in {out} was started with --lora-init {recorded or 'default'}, and this command "
            f"asks for --lora-init {init_name(peft_model) if initial is not None else 'default'}; its checkpoints "
            "only fit the initialisation they started from. Give the same --lora-init"
        )
    if initial is None:
        return
    if resume:
        saved = load_file(where / ADAPTER_WEIGHTS) if (where / ADAPTER_WEIGHTS).is_file() else None
        if (
            saved is None
            or saved.keys() != initial.keys()
            or any(not torch.equal(saved[k], v) for k, v in initial.items())
        ):
            raise KaikaError(
                f"--resume: the {init_name(peft_model)} initialisation computed on this machine is not the one in "
                f"{where} (its checkpoints adapt the residual base that initialisation left, which is not saved). "
                "Resume on the machine and software that started the run, or start again without --resume"
            )
        return
    where.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in initial.items()}, where / ADAPTER_WEIGHTS, metadata={"format": "pt"}
    )
    peft_model.peft_config["default"].save_pretrained(where)


def recorded_init(where: Path) -> str | None:
    """The --lora-init a run recorded in its ``lora_init/`` (None: the run has none)."""
    try:
        return json.loads((where / ADAPTER_CONFIG).read_text(encoding="utf-8")).get("init_lora_weights")
    except (OSError, ValueError):
        return None


def init_name(peft_model) -> str:
    return str(peft_model.peft_config["default"].init_lora_weights)


def save_converted(peft_model, stage: Path, init_dir: Path, **kwargs) -> None:
    """``peft_model.save_pretrained(stage, **kwargs)`` as a plain LoRA on the unmodified base.

    peft rewrites the initial adapter's config during the conversion, so it works on a copy."""
    with tempfile.TemporaryDirectory(
        prefix=STAGE_PREFIX, dir=stage.parent
    ) as tmp:  # a kill leaves it to the next save's cleanup
        copy = Path(tmp) / "initial"
        shutil.copytree(init_dir, copy)
        with warnings.catch_warnings():
            # peft loads the initial adapter beside the trained one to subtract it, and warns that a
            # PiSSA/OLoRA adapter should not share a model with another: this is its conversion
            warnings.filterwarnings("ignore", message=".*changes the base weights of the model")
            peft_model.save_pretrained(stage, path_initial_model_for_weight_conversion=str(copy), **kwargs)
    config = json.loads((stage / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    log.info(
        "saved as a plain LoRA on the unmodified base: rank %s (the trained %s adapter minus its initial "
        "value, peft's conversion)",
        config["r"],
        init_name(peft_model),
    )


def converted_config(config: dict) -> dict:
    """What peft's conversion writes for adapter config ``config``: rank and alpha doubled (alpha × √2
    with rsLoRA, whose scale is alpha / √r), the init a plain one."""
    out = dict(config, r=config["r"] * 2, init_lora_weights=True)
    out["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if out.get(key):
            out[key] = {k: 2 * v for k, v in out[key].items()}
    return out


@torch.no_grad()
def check_conversion(reloaded, trained, base_dtype: torch.dtype, adapter: str = "default") -> float:
    """The converted adapter on the unmodified base (``reloaded``) gives every adapted layer the weight
    the trained model computes with (residual base + trained adapter), up to the rounding of the residual
    to the base's dtype; returns the largest difference relative to an entry's size (its residual and
    adapter terms).

    The check that fails when the conversion is wrong: a wrong scale or sign leaves the whole initial
    component B₀A₀ (the base's largest singular directions) in the difference."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    trained_layers = {n: m for n, m in trained.named_modules() if isinstance(m, LoraLayer)}
    eps = torch.finfo(base_dtype).eps if base_dtype.is_floating_point else 0.0
    worst = 0.0
    for name, layer in reloaded.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        mine = trained_layers.get(name)
        if mine is None:
            raise KaikaError(
                f"verification failed: the saved adapter adapts {name}, which the trained model does not"
            )
        residual = mine.get_base_layer().weight.float().cpu()
        got = layer.get_base_layer().weight.float().cpu() + layer.get_delta_weight(adapter).float().cpu()
        want = residual + mine.get_delta_weight(adapter).float().cpu()
        # What rounding to the base dtype may leave: peft rounds the residual once, and, in half
        # precision, the initial factors B₀, A₀ it subtracted (each entry by half an eps); both bounded
        # entry by entry by eps·(|residual| + scale·|B′|·|A′|). A wrong conversion leaves scale·B₀A₀,
        # some 1/eps times more.
        a, b = (m[adapter].weight.float().cpu() for m in (layer.lora_A, layer.lora_B))
        spread = transpose(layer.scaling[adapter] * (b.abs() @ a.abs()), layer.fan_in_fan_out)
        bound = eps * (residual.abs() + spread) + 64 * torch.finfo(torch.float32).eps * want.abs().max()
        excess = ((got - want).abs() - bound).max().item()
        diff = ((got - want).abs() / (residual.abs() + spread + 1e-30)).max().item()
        if excess > 0:
            raise KaikaError(
                f"verification failed: in {name}, the saved adapter on the unmodified base gives a weight that "
                f"differs from the trained one by up to {diff:.3g} of an entry's size; the conversion of the "
                f"{init_name(trained)} adapter is wrong"
            )
        worst = max(worst, diff)
    return worst
