"""Model cards: the README.md in the Hugging Face Hub's format that every exported student directory holds.

YAML front matter (library_name, base_model = the teacher, pipeline_tag, tags, datasets, metrics),
then the architecture, its parameters and FLOPs, how it was made (the KD pipeline and its config),
its evaluation figures and how to load it. Everything comes from what the run knows: the model in
memory, the run's config and its final evaluation; nothing is looked up on the network. FLOPs are
counted by torch.utils.flop_counter over one forward of a sequence of `sequence_length` tokens (a
multiply-add counts 2), so they hold for any family the model is; attention runs on SDPA's math
backend there, whose matmuls the counter sees (it counts no FLOPs in the fused CPU kernel).

`ModelCardLog` writes the card of `pykd distill` / `pykd finetune` on the trainer's "model" save;
`pykd nas export` and pykd.integrations.transformers.DistillationTrainer call write_model_card.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch import nn

from .cache import replace_atomically
from .callbacks import TrainerCallback
from .config import to_dict
from .models import PACKAGED_HUB_IDS

CARD = "README.md"
PIPELINE_TAGS = {"classification": "text-classification", "regression": "text-classification",
                 "unlabeled": "feature-extraction"}


def base_model_id(teacher: str) -> str:
    """The Hub id (or the local path, as given) of the teacher a student was distilled from."""
    return PACKAGED_HUB_IDS.get(teacher, teacher)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_flops(model: nn.Module, sequence_length: int) -> int:
    """FLOPs of one forward of a single sequence of `sequence_length` tokens (torch.utils.flop_counter)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    ids = torch.ones(1, sequence_length, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def _architecture_lines(model: nn.Module, sequence_length: int) -> list[str]:
    config = model.config
    rows = [("family", config.model_type), ("layers", config.num_hidden_layers), ("hidden size", config.hidden_size),
            ("attention heads", config.num_attention_heads),
            ("FFN width", getattr(config, "intermediate_size", getattr(config, "hidden_dim", None))),
            ("vocabulary", config.vocab_size), ("parameters", f"{count_parameters(model):,}"),
            (f"FLOPs per sequence of {sequence_length} tokens", f"{forward_flops(model, sequence_length):,}")]
    return ["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)]


def _figure(value: float) -> str:
    return f"{value:.4g}"


def model_card(model: nn.Module, *, title: str, teacher: str, task_kind: str, sequence_length: int, made_by: str,
               config: dict | None = None, datasets: tuple = (), metrics: dict | None = None,
               teacher_model: nn.Module | None = None, distilled: bool = True) -> str:
    """The card's text.

    Args:
        model: the exported student (its config and weights are read). title: the card's heading.
        teacher: teacher.path as given (a packaged alias becomes its Hub id).
        task_kind: classification | regression | unlabeled. sequence_length: the length FLOPs are counted at.
        made_by: one sentence on how the model was made (the command or API that wrote it).
        config: what made it (the run config, or its losses section), shown as YAML.
        datasets: the data's names (the front matter lists those that are not local files: the Hub wants ids).
        metrics: {name: final value} of the model's evaluation.
        teacher_model: the teacher, to put its size beside the student's. distilled: False for a fine-tuned model.
    """
    metrics = dict(metrics or {})
    datasets = [str(d) for d in datasets if d]
    front = {"library_name": "transformers", "base_model": base_model_id(teacher),
             "pipeline_tag": PIPELINE_TAGS.get(task_kind, "feature-extraction"),
             "tags": ["pykd", *(["knowledge-distillation", "distillation"] if distilled else []),
                      model.config.model_type]}
    hub_datasets = [d for d in datasets if not Path(d).exists()]
    if hub_datasets:
        front["datasets"] = hub_datasets
    front["metrics"] = sorted(metrics)
    how = "distilled from" if distilled else "fine-tuned from"
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {title}", "",
             f"A {model.config.model_type} encoder {how} `{base_model_id(teacher)}` with "
             f"[pykd](https://pypi.org/project/pykd-distill/). {made_by}", ""]
    if datasets:
        lines += ["Data: " + ", ".join(f"`{d}`" for d in datasets) + ".", ""]
    lines += ["## Architecture", "", *_architecture_lines(model, sequence_length), ""]
    if teacher_model is not None:
        ratio = count_parameters(model) / count_parameters(teacher_model)
        lines += [f"The teacher has {count_parameters(teacher_model):,} parameters and "
                  f"{forward_flops(teacher_model, sequence_length):,} FLOPs per sequence: the student keeps "
                  f"{ratio:.1%} of its parameters.", ""]
    lines += ["## Evaluation", ""]
    if metrics:
        rows = (f"| {name} | {_figure(value)} |" for name, value in sorted(metrics.items()))
        lines += ["| metric | value |", "|---|---|", *rows, ""]
    else:
        lines += ["No evaluation was run for this directory.", ""]
    if config:
        lines += ["## How it was made", "", "```yaml", yaml.safe_dump(config, sort_keys=False).strip(), "```", ""]
    auto = "AutoModel" if task_kind == "unlabeled" else "AutoModelForSequenceClassification"
    lines += ["## How to load it", "", "```python", f"from transformers import AutoTokenizer, {auto}", "",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)  # this directory, or its Hub id once pushed",
              f"model = {auto}.from_pretrained(PATH)", "```", "",
              "`pykd_objective.pt`, where present, holds the distillation's learned parts (projections, critics, "
              "EMD layer weights); inference does not need it.", ""]
    return "\n".join(lines)


def write_model_card(directory, model: nn.Module, **card) -> Path:
    """directory/README.md (written atomically) with the card of `model` (keyword arguments: model_card's)."""
    path = Path(directory) / CARD
    text = model_card(model, **{"title": Path(directory).resolve().name, **card})
    replace_atomically(path, lambda partial: partial.write_text(text))
    return path


def final_metrics(history: list[dict]) -> dict:
    """The last evaluation's metrics in a run's history (pykd.distill.trainer records), {} if none."""
    evaluations = [record["eval"] for record in history if "eval" in record]
    return dict(evaluations[-1]) if evaluations else {}


class ModelCardLog(TrainerCallback):
    """Writes the model card into each "model" directory the Trainer saves (rank 0)."""

    def on_save(self, trainer, path: Path, what: str) -> None:
        if what != "model" or trainer.rank != 0:
            return
        config = trainer.config
        models = trainer.step_module.models()
        verb = f"Made by `pykd {trainer.mode}`"
        write_model_card(path, trainer.step_module.trained_model(), teacher=config.teacher.path,
                         task_kind=config.data.kind, sequence_length=config.data.max_length,
                         made_by=f"{verb} in {trainer.step} steps; the run's config follows.",
                         config=to_dict(config), datasets=(config.data.dataset,),
                         metrics=final_metrics(trainer.history),
                         teacher_model=models[1] if len(models) > 1 else None, distilled=trainer.mode != "finetune")
