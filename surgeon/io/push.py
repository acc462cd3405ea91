"""Publishing artifacts to the Hugging Face Hub with a model card, through ``huggingface_hub.HfApi``.

The uploaded folder is what timm users expect (``config.json`` with timm's fields, ``model.safetensors``)
plus a ``README.md`` model card built with ``ModelCard``/``ModelCardData``. Only an allowlist leaves the machine:
the validated config, the weights it names (checked against its SHA-256), and the exports it records (each checked
against its own SHA-256); symbolic links are refused, anything else in the directory stays local. Files are staged
in a temporary directory (the artifact directory is never modified) and uploaded in one commit: either everything
lands or nothing does. An existing README on the Hub is kept unless ``overwrite_card``.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from torch import nn

from surgeon.io.checkpoint import sha256_file
from surgeon.io.converted import save
from surgeon.io.hub import HubError, explain, hub_endpoint, offline
from surgeon.io.layout import read_artifact_config
from surgeon.io.merged import save_merged
from surgeon.io.names import ADAPTER_CONFIG_NAME, CONFIG_NAME

T = TypeVar("T")


TAGS = ["timm", "image-classification", "surgeon", "quadranet-v2", "s2a"]


@dataclass
class PushResult:
    repo_url: str
    commit_url: str
    pull_request_url: str | None
    card_written: bool
    files: list[str]


def _retry_server_errors(upload: Callable[[], T], attempts: int = 3, first_wait: float = 0.5) -> T:
    """Run ``upload`` again after a 5xx answer (with back-off). Without ``hf_xet`` huggingface_hub sends the
    commit once; a commit that failed with 5xx changed nothing, so sending it again is safe."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(attempts):
        try:
            return upload()
        except HfHubHTTPError as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status is None or status < 500 or attempt == attempts - 1:
                raise
            time.sleep(first_wait * 2**attempt)
    raise AssertionError("unreachable")


def _text(value: Any) -> str:
    """A config value as inert Markdown text: one line, HTML and Markdown punctuation escaped."""
    flat = " ".join(str(value).split())[:500]
    return re.sub(r"([\\`*_{}\[\]()#+!|~>-])", r"\\\1", html.escape(flat, quote=True))


def _code(value: Any) -> str:
    """A config value as inline code that cannot close its own span or break the line."""
    return "`" + " ".join(str(value).split())[:200].replace("`", "'") + "`"


def card_base_model(config: dict[str, Any]) -> str | None:
    """The Hub id the card's ``base_model`` names: only the repo the base weights really came from (timm's Hub copy
    of its pretrained weights, or the ``hf-hub:`` repo), never for a random-init or local-file base."""
    section = config.get("surgeon", {})
    source, kind = section.get("base_model") or "", section.get("base_weights")
    if kind == "hf-hub" and source.startswith(("hf-hub:", "transformers:")):
        return source.removeprefix("hf-hub:").removeprefix("transformers:").split("@")[0]
    if kind == "timm" and source.startswith("timm:"):
        hub_id = (config.get("pretrained_cfg") or {}).get("hf_hub_id")
        return hub_id if isinstance(hub_id, str) and hub_id else None
    return None


def _card(config: dict[str, Any], repo_id: str) -> str:
    """Model card text (YAML metadata + markdown) from an artifact's config; every config value is escaped."""
    from huggingface_hub import ModelCard, ModelCardData

    section = config.get("surgeon", {})
    cfg = config.get("pretrained_cfg") or {}
    recipe = section.get("recipe") or {}
    base_model = card_base_model(config)
    metrics = section.get("metrics") or {}
    # timm rebuilds a timm-based artifact's architecture; a transformers-based one loads through surgeon only
    library = "surgeon" if section.get("transformers_config") is not None else "timm"
    data = ModelCardData(library_name=library, base_model=base_model, tags=[*TAGS, recipe.get("name", "")],
                         license=cfg.get("license") or "other", pipeline_tag="image-classification")
    sites = section.get("sites") or []
    layers = section.get("layers") or []
    lines = [
        f"# {_text(repo_id.split('/')[-1])}",
        "",
        f"{_code(config.get('architecture'))} after model surgery with [surgeon](https://pypi.org/project/surgeon/) "
        f"recipe **{_text(recipe.get('name', '?'))}**: {_text(recipe.get('description', ''))}",
        "",
        f"- checkpoint format: {_code(section.get('format'))} (surgeon {_text(section.get('version'))})",
        f"- base model: {_code(section.get('base_model') or section.get('base_weights') or 'unknown')}",
    ]
    if section.get("format") == "merged":
        verification = section.get("merge_verification") or {}
        added = sum(e["channels"] * e["rank"] * 2 * e["kernel_size"][0] * e["kernel_size"][1] for e in layers)
        lines += [f"- quadratic depthwise layers: {len(layers)} (dense QuadraLib layout, {added:,} extra weights)",
                  f"- folded BatchNorms: {len(section.get('folded_batchnorm') or {})}",
                  f"- merge verification: max |Δ| = {verification.get('max_abs_diff', float('nan')):.3g} "
                  f"(relative {verification.get('relative', float('nan')):.3g}) vs the unmerged model"]
    elif section.get("format") == "adapter":
        lines += [f"- adapter-only: the {len(section.get('trainable') or [])} trainable tensors; loading converts "
                  "the base model with the recipe and applies them (PEFT's adapter layout: `adapter_config.json` + "
                  "`adapter_model.safetensors`)"]
    else:
        swapped = [s for s in sites if s.get("action") == "swap"]
        by_target: dict[str, int] = {}
        for site in swapped:
            by_target[site["target"]] = by_target.get(site["target"], 0) + 1
        lines += [f"- swapped sites: {', '.join(f'{n} {t}' for t, n in sorted(by_target.items())) or 'none'}",
                  f"- added parameters: {sum(s.get('added_params', 0) for s in swapped):,}",
                  f"- trainable tensors: {len(section.get('trainable') or [])}"]
        unreachable = [s for s in sites if s.get("action") == "unreachable"]
        if unreachable:
            lines.append(f"- unreachable sites: {len(unreachable)}")
    if metrics:
        lines.append(f"- validation after adaptation: top-1 {_text(metrics.get('val_top1'))}, top-5 "
                     f"{_text(metrics.get('val_top5'))} ({_text(metrics.get('epochs_trained'))} epochs)")
    lines += ["", "## Usage", "", "```python", "import surgeon", "",
              f'model = surgeon.load("hf-hub:{repo_id}")', "model.eval()", "```", ""]
    if section.get("format") == "adapter":
        lines += ["This loads the base model named above (`base_model`). To apply the adapters to a base you already "
                  "have (the unconverted pretrained model):", "", "```python",
                  f'model = surgeon.load("hf-hub:{repo_id}", model=base_model)', "```", ""]
    else:
        lines += ["From timm (it builds the base architecture from this repository's `config.json`; surgeon then "
                  "swaps in its layers and loads the weights):", "",
                  "```python", "import surgeon", "import timm", "",
                  f'model = surgeon.from_timm(timm.create_model("hf-hub:{repo_id}", pretrained=False))', "```", ""]
    lines += _exports_section(section.get("exports") or [])
    # still JSON; it can neither close the fence nor carry markup
    recipe_json = json.dumps(recipe, indent=2).replace("`", "\\u0060").replace("<", "\\u003c")
    lines += ["## Recipe", "", "```json", recipe_json, "```", ""]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def _exports_section(exports: list[dict[str, Any]]) -> list[str]:
    """The card's table of exported files (``surgeon export``) and how each was checked against PyTorch."""
    if not exports:
        return []
    lines = ["## Exported files", "",
             "| file | format | input | check | max abs Δ | relative Δ (tolerance) |", "|---|---|---|---|---|---|"]
    for entry in exports:
        check = entry.get("check") or {}
        shape = "×".join(str(n) for n in entry.get("input_shape") or [])
        checked = (f"{check.get('runtime')}, {check.get('inputs')}, batch "
                   f"{' and '.join(str(b) for b in check.get('batch_sizes') or [])}") if check else "not checked"
        numbers = (f"{check['max_abs_diff']:.3g} | {check['relative']:.3g} ({check['tolerance']:.3g})"
                   if check else "- | -")
        lines.append(f"| {_code(entry.get('file'))} | {_text(entry.get('format'))} | N×{_text(shape)} (dynamic N) "
                     f"| {_text(checked)} | {numbers} |")
    lines += [""]
    if any(e.get("format") == "onnx" for e in exports):
        lines += ["```python", "import onnxruntime", "",
                  'session = onnxruntime.InferenceSession("model.onnx")',
                  'logits = session.run(None, {"pixel_values": images.numpy()})[0]', "```", ""]
    if any(e.get("format") == "torch-export" for e in exports):
        lines += ["```python", "import surgeon.ops.kernels  # registers torch.ops.surgeon.quadratic_dwconv",
                  "import torch", "", 'model = torch.export.load("model.pt2").module()', "```", ""]
    return lines


def upload_files(directory: Path) -> tuple[str, dict[str, Any], list[str]]:
    """The config name, the validated config, and the allowlist of files ``push`` sends from ``directory``: the
    config, the weights it names and the exports it records, each verified against its SHA-256. A symbolic link
    among them is refused; nothing else in the directory is ever sent."""
    config_name = CONFIG_NAME if (directory / CONFIG_NAME).exists() else ADAPTER_CONFIG_NAME
    if not (directory / config_name).exists():
        raise HubError(f"{directory}: not an artifact directory (no {CONFIG_NAME} or {ADAPTER_CONFIG_NAME})")
    if (directory / config_name).is_symlink():
        raise HubError(f"{directory / config_name} is a symbolic link; push sends only regular files")
    config = read_artifact_config(directory, config_name)
    section = config["surgeon"]
    files = [config_name, section["weights_file"]]
    digests = {section["weights_file"]: section["weights_sha256"]}
    for entry in section.get("exports") or []:
        files.append(entry["file"])
        digests[entry["file"]] = entry["sha256"]
    for name in files:
        path = directory / name
        if path.is_symlink():
            raise HubError(f"{path} is a symbolic link; push sends only regular files (copy it in)")
        if not path.is_file():
            raise HubError(f"{path}: listed in {config_name} but missing")
        if name in digests and sha256_file(path) != digests[name]:
            raise HubError(f"{path}: SHA-256 does not match {config_name}; nothing was pushed")
    return config_name, config, list(dict.fromkeys(files))


def push_to_hub(source: str | Path | nn.Module, repo_id: str, private: bool = False, create_pr: bool = False,
                revision: str | None = None, token: str | None = None, commit_message: str | None = None,
                overwrite_card: bool = False, dry_run: bool = False) -> PushResult:
    """Upload an artifact directory (or a converted/merged model, saved first) to ``repo_id``. With ``dry_run``,
    nothing is sent: the result lists exactly the files that would be (the card as ``README.md``)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    if offline() and not dry_run:
        raise HubError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set (unset it and make sure the Hub is "
                       "reachable)")
    with tempfile.TemporaryDirectory(prefix="surgeon-push-") as scratch:
        staging = Path(scratch) / "upload"
        if isinstance(source, nn.Module):
            _save_model(source, staging)
            directory = staging
        else:
            directory = Path(str(source).removeprefix("local-dir:"))
        _, config, files = upload_files(directory)
        if directory != staging:
            staging.mkdir()
            for name in files:
                shutil.copyfile(directory / name, staging / name, follow_symlinks=False)
        if dry_run:
            return PushResult(repo_url="", commit_url="", pull_request_url=None, card_written=True,
                              files=[*files, "README.md"])
        api = HfApi(endpoint=hub_endpoint(), token=token)
        try:
            repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            has_card = api.file_exists(repo_id, "README.md", revision=revision)
        except HfHubHTTPError as exc:
            raise explain(exc, "cannot create", repo_id) from exc
        except OSError as exc:
            raise explain(exc, "cannot create", repo_id) from exc
        write_card = overwrite_card or not has_card
        if write_card:
            (staging / "README.md").write_text(_card(config, repo_id), encoding="utf-8")
        message = commit_message or f"Upload {config.get('architecture')} ({config['surgeon'].get('format')}) " \
            "with surgeon"
        sent = sorted(entry.name for entry in staging.iterdir())
        try:
            info = _retry_server_errors(lambda: api.upload_folder(
                folder_path=str(staging), repo_id=repo_id, revision=revision, create_pr=create_pr,
                commit_message=message))
        except HfHubHTTPError as exc:
            raise explain(exc, "upload to", repo_id) from exc
        except OSError as exc:
            raise explain(exc, "upload to", repo_id) from exc
    return PushResult(repo_url=str(repo_url), commit_url=str(info.commit_url),
                      pull_request_url=getattr(info, "pr_url", None) or None, card_written=write_card, files=sent)


def _save_model(model: nn.Module, directory: Path) -> None:
    if getattr(model, "surgeon_merge", None) is not None:
        save_merged(model, directory)
    elif getattr(model, "surgeon_info", None) is not None:
        save(model, directory)
    else:
        raise HubError("push a model returned by surgeon.convert, surgeon.merge or surgeon.load")
