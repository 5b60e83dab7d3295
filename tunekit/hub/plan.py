"""Planning a push on this machine: what goes up, checked, and what the card says.

Nothing here writes to the Hub; it only reads (the base model's config and
card). An adapter passes the validity gate (``tunekit.adapter_check``) against
the config of the base its pushed files name, so a wrong ``--base-model`` is
caught before upload; a model's shards must be complete and finite.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.hub.access import PushError, hub_failure
from tunekit.hub.card import CardSpec, RunFacts, adapter_spec, merged_record, merged_spec
from tunekit.hub.manifest import Manifest, adapter_manifest, hub_id_or_none, model_manifest

__all__ = ["LOSS_CURVE", "Plan", "plan_adapter", "plan_model", "recorded_source"]

LOSS_CURVE = "loss_curve.png"


@dataclass
class Plan:
    """One repo's worth of files, its card spec, and lines to tell the user."""

    manifest: Manifest
    spec: CardSpec
    extra: dict[str, bytes] = field(default_factory=dict)
    """Generated files other than the card (the loss-curve image)."""
    notes: list[str] = field(default_factory=list)


def recorded_source(folder: Path) -> tuple[str | None, dict[str, Any]]:
    """(base source the adapter folder records, its model record)."""
    from tunekit.adapter_check import recorded_base

    _, _, model = recorded_base(folder)
    return model.get("name_or_path"), model


def _fetch(api, repo_id: str, name: str, revision: str | None, into: Path) -> Path:
    return Path(api.hf_hub_download(repo_id, name, revision=revision, local_dir=into))


def _base_config(api, base_id: str, revision: str | None, local: str | None, model: dict[str, Any], notes: list):
    """The base model's config: from the Hub id the push names, else (gated, unreachable) the local copy."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from transformers import AutoConfig

    from tunekit.models import resolve_source

    trust = bool(model.get("trust_remote_code"))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            _fetch(api, base_id, "config.json", revision, Path(tmp))
            return AutoConfig.from_pretrained(tmp, trust_remote_code=trust)
    except GatedRepoError as err:
        failure = err
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as err:
        raise PushError(f"base model {base_id!r} was not found on the Hub ({type(err).__name__}); check "
                        "--base-model: the pushed adapter names it as its base") from None
    except OSError as err:
        failure = err
    if not local:
        raise hub_failure(f"reading the config of base model {base_id!r}", failure)
    notes.append(f"could not read {base_id}'s config on the Hub; checked the adapter against the local base {local}")
    return AutoConfig.from_pretrained(resolve_source(local), trust_remote_code=trust)


def _license(api, base_id: str | None, local: str | None) -> str | None:
    """The base's license from its card (on the Hub, else in the local folder); None when not stated."""
    from huggingface_hub import ModelCard

    from tunekit.models import resolve_source

    cards = []
    if base_id:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cards.append(_fetch(api, base_id, "README.md", None, Path(tmp)).read_text(encoding="utf-8"))
        except Exception:  # noqa: BLE001 - no card, no access: the license is simply not known
            pass
    if not cards and local:
        try:
            readme = Path(resolve_source(local)) / "README.md"
            cards += [readme.read_text(encoding="utf-8")] if readme.is_file() else []
        except ValueError:
            pass
    license_ = ModelCard(cards[0], ignore_metadata_errors=True).data.license if cards else None
    return license_ if isinstance(license_, str) else None


def _loss_curve(facts: RunFacts, notes: list[str]) -> bytes | None:
    if facts.metrics_file is None:
        return None
    try:
        from tunekit.plot import plot_metrics

        with tempfile.TemporaryDirectory() as tmp:
            plot_metrics(facts.metrics_file, Path(tmp) / LOSS_CURVE, metrics=("loss",), title="")
            return (Path(tmp) / LOSS_CURVE).read_bytes()
    except ImportError:
        notes.append("no loss-curve image in the card: matplotlib is not installed (pip install matplotlib)")
    except ValueError:
        pass  # no loss was logged
    return None


def _adapter_folders(folder: Path) -> list[Path]:
    return [folder, *(sub for sub in sorted(folder.iterdir()) if (sub / "adapter_config.json").is_file())]


def plan_adapter(api, folder: Path, run: Path | None, repo_id: str, revision: str, base_id: str,
                 train_stats: dict | None = None, local_base: bool = False) -> Plan:
    """Plan an adapter push whose files name ``base_id`` as their base.

    ``local_base``: ``base_id`` is about to be pushed from the local base the run recorded, so the
    adapter is checked against that one.
    """
    from transformers import AutoConfig

    from tunekit.adapter_check import check_adapter_folder, recorded_base
    from tunekit.models import resolve_source

    _, _, model = recorded_base(folder)
    local = model.get("name_or_path")
    base_revision = model.get("revision") if base_id == local else None
    notes: list[str] = []
    if local_base:
        trust = bool(model.get("trust_remote_code"))
        config = AutoConfig.from_pretrained(resolve_source(local), trust_remote_code=trust)
    else:
        config = _base_config(api, base_id, base_revision, local if local != base_id else None, model, notes)
    for sub in _adapter_folders(folder):
        check_adapter_folder(sub, config)
    spec = adapter_spec(folder, run, repo_id, base_id, revision=revision, train_stats=train_stats,
                        license=_license(api, None if local_base else base_id, local), endpoint=api.endpoint)
    return _finish(Plan(adapter_manifest(folder, base_id, base_revision, repo_id), spec, notes=notes))


def _finish(plan: Plan) -> Plan:
    """Add the loss curve (runs only) and say what stays home."""
    if plan.spec.kind != "base":
        _add_curve(plan)
    if plan.manifest.left_out:
        plan.notes.append(f"not pushed from {plan.manifest.folder}: {', '.join(plan.manifest.left_out)}")
    return plan


def _add_curve(plan: Plan) -> None:
    image = _loss_curve(plan.spec.facts, plan.notes)
    if image is not None:
        plan.extra[LOSS_CURVE], plan.spec.image = image, LOSS_CURVE


def _model_task(folder: Path, recorded: str | None) -> str:
    if recorded:
        return recorded
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("is_encoder_decoder"):
        return "seq2seq"
    archs = config.get("architectures") or []
    return "seq_cls" if any(a.endswith("ForSequenceClassification") for a in archs) else "causal_lm"


def plan_model(api, folder: Path, run: Path | None, repo_id: str, revision: str, base_model: str | None,
               kind: str, train_stats: dict | None = None) -> Plan:
    """Plan the push of a model folder: a merged model (``kind="merged"``) or a base (``"base"``)."""
    from tunekit.hub.manifest import check_model_weights

    task, model, _ = merged_record(run) if kind == "merged" else (None, None, None)
    notes: list[str] = []
    base_id = base_model or hub_id_or_none((model or {}).get("name_or_path"))
    if kind == "merged" and base_id is None:
        notes.append("the base model has no Hub id (a local folder, pkg: or model.from_config): the card names "
                     "no base_model; pass --base-model HUB_ID to name it")
    manifest = model_manifest(folder, base_id)
    check_model_weights(manifest)
    license_ = _license(api, base_id, (model or {}).get("name_or_path") or str(folder))
    if kind == "merged":
        spec = merged_spec(run, repo_id, base_id, _model_task(folder, task), revision=revision,
                           train_stats=train_stats, license=license_, endpoint=api.endpoint)
    else:
        spec = CardSpec(repo_id=repo_id, kind=kind, base_model=base_id, task=_model_task(folder, task),
                        method_tag=None, adapter=None, peft_format=False, revision=revision, license=license_,
                        endpoint=api.endpoint)
    return _finish(Plan(manifest, spec, notes=notes))
