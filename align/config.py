"""Configuration: one flat dataclass per stage, a help text and the valid values per field.

YAML files and command-line overrides are merged here and nowhere else: `load_config(cls, argv)` reads
`--config FILE`, applies every `--field value` on top, checks types and names, and returns a frozen view of
the run's settings. Every field can be set in YAML or on the command line, and `align <stage> --help`
lists them with their help text, grouped by topic.

Every field declares its valid values where it is declared: ``_f(default, help, choices=..., ge=, gt=, le=,
lt=)`` (for a list field, ``choices`` applies to each element; a number must be finite). Building a config
checks them all (:class:`Checked`), so a stage refuses a bad value, one line per problem naming the field, the
value and the rule, before it reads, loads or writes anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class AlignError(Exception):
    """A user-facing error: printed by the CLI as one line per problem (``error: ...``), which then exits 2."""


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _f(default: Any, help: str, *, choices: tuple | None = None, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None) -> Any:
    """A config field: its default, help text and valid values (``choices``; bounds ``ge``/``gt``/``le``/``lt``)."""
    meta: dict[str, Any] = {"help": help}
    for k, v in (("choices", choices), ("ge", ge), ("gt", gt), ("le", le), ("lt", lt)):
        if v is not None:
            meta[k] = v
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def rule_text(meta: dict[str, Any]) -> str:
    """The declared rule of a field as words: 'one of a, b', '>= 1', 'in [0, 1)'; '' when there is none."""
    if "choices" in meta:
        return "one of " + ", ".join(map(str, meta["choices"]))
    lo = [(k, meta[k]) for k in ("ge", "gt") if k in meta]
    hi = [(k, meta[k]) for k in ("le", "lt") if k in meta]
    if lo and hi:
        (lk, lv), (hk, hv) = lo[0], hi[0]
        return f"in {'[' if lk == 'ge' else '('}{lv}, {hv}{']' if hk == 'le' else ')'}"
    return " and ".join(f"{_BOUNDS[k]} {v}" for k, v in lo + hi)


def _breaks(meta: dict[str, Any], v: Any) -> bool:
    if "choices" in meta:
        return v not in meta["choices"]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    return not math.isfinite(v) or any(not {"ge": v >= b, "gt": v > b, "le": v <= b, "lt": v < b}[k]
                                       for k, b in meta.items() if k in _BOUNDS)


def field_problems(cfg: Any) -> list[str]:
    """One line per field whose value breaks its declared rule (or is a number that is not finite)."""
    out = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        for v in (value if isinstance(value, list) else [value]):
            if _breaks(f.metadata, v):
                rule = rule_text(f.metadata) or "a finite number"
                out.append(f"field '{f.name}': {v!r} is not {rule}")
                break
    return out


class Checked:
    """Base of every stage's config dataclass: building one checks every field against its declared rule."""

    def __post_init__(self) -> None:
        problems = field_problems(self)
        if problems:
            raise AlignError("\n".join(problems))


DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # the `dtype` names of every config


@dataclass
class BaseConfig(Checked):
    """Fields shared by every training stage (names follow Hugging Face `TrainingArguments`)."""

    model: str = _f("", "Hub id or local path of the model to start from (a causal LM).")
    train_data: str = _f("", "Training data: a local .jsonl/.json/.parquet/.csv file or a hub dataset id.")
    eval_data: str = _f("", "Optional evaluation data, same formats as train_data.")
    train_split: str = _f("train", "Split to read when train_data is a hub dataset id.")
    eval_split: str = _f("test", "Split to read when eval_data is a hub dataset id.")
    column_map: dict = _f({}, "Rename data columns on reading, {our name: the data's name}, e.g. "
                                 "{prompt: question, answer: final_answer} for a hub data set with other names.")
    output_dir: str = _f("", "Where the final model, metrics.jsonl and checkpoints/ are written.")
    overwrite_output_dir: bool = _f(False, "Allow writing into a non-empty output_dir (other than resuming).")
    seed: int = _f(0, "Random seed for data order, initialisation of new heads and sampling.", ge=0)
    max_steps: int = _f(-1, "Number of optimizer steps; -1 derives it from num_train_epochs.", ge=-1)
    num_train_epochs: float = _f(1.0, "Passes over train_data when max_steps is -1.", gt=0)
    per_device_train_batch_size: int = _f(8, "Examples per process per micro-batch.", ge=1)
    per_device_eval_batch_size: int = _f(32, "Examples per process per evaluation batch.", ge=1)
    gradient_accumulation_steps: int = _f(1, "Micro-batches accumulated into one optimizer step.", ge=1)
    learning_rate: float = _f(1e-5, "Peak learning rate of AdamW.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay (not applied to biases and norms).", ge=0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "AdamW beta2.", ge=0, lt=1)
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.", gt=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.", ge=0)
    lr_scheduler_type: str = _f("linear", "Learning-rate schedule after warmup: constant, linear or cosine.",
                                choices=("constant", "linear", "cosine"))
    warmup_steps: int = _f(0, "Linear warmup steps (overrides warmup_ratio when > 0).", ge=0)
    warmup_ratio: float = _f(0.0, "Fraction of max_steps used for linear warmup.", ge=0, le=1)
    logging_steps: int = _f(10, "Log metrics every N optimizer steps (and at the last step).", ge=1)
    eval_steps: int = _f(0, "Evaluate every N steps (0: only at the end, if eval_data is set).", ge=0)
    save_steps: int = _f(0, "Write a resumable checkpoint every N steps (0: only the final model).", ge=0)
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (oldest removed first); 0 keeps all.", ge=0)
    resume_from_checkpoint: str = _f("", "Checkpoint directory to resume from, or 'latest' for the newest one "
                                         "in output_dir/checkpoints.")
    max_length: int = _f(512, "Maximum tokens of one training sequence; longer examples are an error.", ge=2)
    dtype: str = _f("auto", "Weights dtype: auto (fp32 on CPU, bf16 autocast on GPUs that support it), "
                            "float32, bfloat16 or float16.",
                    choices=DTYPE_CHOICES)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory (slower).")
    trust_remote_code: bool = _f(False, "Allow model code from the hub repository to run (off: safer).")
    use_lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.", ge=1)
    lora_alpha: int = _f(32, "LoRA scaling alpha.", gt=0)
    lora_dropout: float = _f(0.0, "LoRA dropout.", ge=0, lt=1)
    lora_target_modules: list = _f(["all-linear"], "Modules that get LoRA adapters; 'all-linear' means every "
                                                    "linear layer except the output head.")
    report_to: list = _f([], "Experiment trackers besides metrics.jsonl (always written), handed to accelerate: "
                             "any of tensorboard, wandb, mlflow, trackio, comet_ml, or all (every installed one); "
                             "empty or none: no tracker.",
                        choices=("none", "all", "tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "comet"))
    run_name: str = _f("", "Name of the run in the trackers (default: the output_dir's folder name).")
    merge_lora: bool = _f(False, "With use_lora: save the base model with the adapter merged in (a full model that "
                                 "loads with AutoModelForCausalLM.from_pretrained; a reward model with "
                                 "AutoModelForSequenceClassification) instead of the adapter alone; PPO's critic "
                                 "adapter is merged into output_dir/value_model too. Without use_lora: no effect.")
    push_to_hub: bool = _f(False, "Upload output_dir's final model and tokenizer (not checkpoints/ or tensorboard/) "
                                  "to the Hugging Face Hub after the final save; refused before training when "
                                  "HF_HUB_OFFLINE is set or there is no token (`hf auth login` or HF_TOKEN).")
    hub_model_id: str = _f("", "Hub repository for push_to_hub, e.g. user/my-model (default: the output_dir's "
                               "folder name under your account).")
    disable_tqdm: bool = _f(False, "Hide the progress bar.")
    num_threads: int = _f(0, "CPU threads for torch (0: torch's default). Tiny models run fastest on 1.", ge=0)


@dataclass
class SFTConfig(BaseConfig):
    """Supervised fine-tuning on demonstrations."""

    learning_rate: float = _f(2e-5, "Peak learning rate of AdamW.", gt=0)
    completion_only_loss: bool = _f(True, "Loss on completion / assistant tokens only (prompt tokens masked).")
    packing: bool = _f(True, "Pack sequences into rows of max_length tokens so padding costs no compute "
                             "(attention stays within each sequence).")
    text_field: str = _f("text", "Column holding plain text for language-modelling data.")
    add_eos: bool = _f(True, "Append the tokenizer's EOS token after each completion / text.")


@dataclass
class ComparisonConfig(BaseConfig):
    """What the stages that train on comparisons (reward model, DPO) read the same way."""

    per_device_train_batch_size: int = _f(8, "Prompts (comparison rows) per process per micro-batch; a ranked "
                                             "row of K responses counts once and gives K(K-1)/2 pairs.", ge=1)
    ranking_column: str = _f("ranking", "For ranked rows (prompt + responses): optional column of ranks, one "
                                        "per response, 1 = best (ties make no pair); without it responses are "
                                        "ordered best first.")
    on_bad_pair: str = _f("error", "Rows with no preference to learn (chosen identical to rejected, identical "
                                   "responses in a ranked list, or all ranks equal): error stops before "
                                   "training; skip drops them and reports the count.", choices=("error", "skip"))


@dataclass
class RMConfig(ComparisonConfig):
    """Reward model: a scalar head on a causal LM trained on pairwise or ranked comparisons (Bradley-Terry)."""

    learning_rate: float = _f(1e-5, "Peak learning rate of AdamW (the new head and the backbone alike).", gt=0)
    margin_column: str = _f("margin", "Column with a per-pair margin m in -log sigmoid(r_c - r_r - m); rows "
                                      "without it (or files without the column) use 0. Empty: ignore margins.")
    center_rewards_coefficient: float = _f(0.0, "Weight of the reward-centring penalty, coefficient * mean of "
                                               "r^2 over the responses of a comparison, which keeps rewards near "
                                               "zero for the RL stage (TRL name; 0.01 is a common value).", ge=0)
    share_prompt: bool = _f(True, "Run each comparison's prompt once, its responses attending to it through a "
                                  "4-D attention mask (same rewards as separate sequences, fewer tokens); off, "
                                  "or with flash-attention: every response is a separate padded sequence.")


def field_help(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type name, default, help) for every field of a config dataclass, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((f.name, _type_name(f), default, f.metadata.get("help", "")))
    return out


def _type_name(f: dataclasses.Field) -> str:
    t = f.type if not isinstance(f.type, str) else f.type
    return str(t).replace("typing.", "")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, where: str, name: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or raise a one-line AlignError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return "" if value is None else str(value)
        if typ is list:
            if isinstance(value, list):
                return list(value)
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [value]
        if typ is dict:
            if isinstance(value, dict):
                return dict(value)
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(parsed, dict):
                raise ValueError
            return parsed
    except (TypeError, ValueError):
        pass
    tname = getattr(typ, "__name__", str(typ))
    raise AlignError(f"{where}: field '{name}': expected {tname}, got {value!r}")


def build_config(cls: type, values: dict[str, Any], where: str) -> Any:
    """Create `cls` from a mapping, rejecting unknown fields, values of the wrong type and values that break a
    field's declared rule (every such field, one line each, prefixed with `where`)."""
    types = _field_types(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in types:
            near = [n for n in types if n.split("_")[0] == str(name).split("_")[0]][:3]
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise AlignError(f"{where}: unknown config field '{name}' for {cls.__name__}{hint}")
        kwargs[name] = _coerce(value, types[name], where, name)
    try:
        return cls(**kwargs)
    except AlignError as e:
        raise AlignError("\n".join(f"{where}: {line}" for line in str(e).splitlines())) from None


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise AlignError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise AlignError(f"{path}:{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise AlignError(f"{path}: a config file must be a mapping of field: value")
    return data


# `align <stage> --help` groups: field name -> topic; a stage's own fields form a group of their own
HELP_GROUPS: dict[str, tuple[str, ...]] = {
    "model": ("model", "ref_model", "reward_model", "value_model", "dtype", "frozen_dtype", "trust_remote_code",
              "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "share_base",
              "gradient_checkpointing"),
    "data": ("train_data", "eval_data", "train_split", "eval_split", "column_map", "max_length", "eval_max_samples"),
    "optimisation": ("max_steps", "num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "max_tokens_per_micro_batch", "learning_rate", "weight_decay",
                     "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "lr_scheduler_type", "warmup_steps",
                     "warmup_ratio", "seed", "num_threads"),
    "RL: sampling, rewards and KL": ("max_new_tokens", "temperature", "top_p", "top_k", "missing_eos_penalty",
                                     "reward_funcs", "reward_weights", "gold_reward_funcs", "beta",
                                     "kl_estimator"),
    "output, logging and checkpoints": ("output_dir", "overwrite_output_dir", "logging_steps", "eval_steps",
                                        "save_steps", "save_total_limit", "resume_from_checkpoint", "report_to",
                                        "run_name", "disable_tqdm", "merge_lora", "push_to_hub", "hub_model_id"),
}
_GROUP_OF = {name: group for group, names in HELP_GROUPS.items() for name in names}


def make_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with `--config` and one `--name` option per dataclass field, grouped by topic (help,
    default and valid values from the field's declaration)."""
    p = argparse.ArgumentParser(prog=prog, description=description or (cls.__doc__ or ""), allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML file with field: value lines; command-line options "
                                                  "override it.")
    own = f"{cls.__name__.removesuffix('Config')} settings"
    fields = dataclasses.fields(cls)
    titles = [*list(HELP_GROUPS)[:-1], own, list(HELP_GROUPS)[-1]]  # the stage's own before output/logging
    used = {_GROUP_OF.get(f.name, own) for f in fields}
    groups = {t: p.add_argument_group(t) for t in titles if t in used}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        rule = rule_text(f.metadata)
        text = f"{f.metadata.get('help', '')} (default: {shown!r}{'; ' + rule if rule else ''})"
        groups[_GROUP_OF.get(f.name, own)].add_argument(f"--{f.name}", dest=f.name, default=argparse.SUPPRESS,
                                                        metavar=_type_name(f).upper(), help=text.replace("%", "%%"))
    return p


def load_config(cls: type, argv: list[str], prog: str) -> Any:
    """Parse `--config FILE --field value ...` into `cls`; command-line values override the YAML file."""
    parser = make_parser(cls, prog)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise AlignError(f"command line: unknown option '{unknown[0]}' for {prog} (see {prog} --help)")
    values: dict[str, Any] = {}
    where = "command line"
    if args.config:
        values.update(read_yaml(args.config))
        # fail on the file's own unknown fields with the file named
        build_config(cls, values, args.config)
        where = f"{args.config} + command line"
    cli_values = {k: v for k, v in vars(args).items() if k != "config"}
    build_config(cls, cli_values, "command line")
    values.update(cli_values)
    return build_config(cls, values, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# reinforcement learning stages


FROZEN_DTYPE_HELP = ("dtype of the models that are never trained here (a reference or reward model of their own): "
                     "auto (bf16 where dtype gives bf16 autocast, i.e. on capable GPUs; else the trained weights' "
                     "dtype), float32, bfloat16 or float16. bfloat16 on a CPU with native bf16 (AVX512-BF16 or AMX) "
                     "halves their memory and time; their log-probs and scores then carry bf16 rounding.")


@dataclass
class RLConfig(BaseConfig):
    """Fields shared by the RL stages (PPO, GRPO, ...): sampling, reward sources, reference model, KL penalty.

    train_data holds prompts: a 'prompt' column (string or chat messages) and any other columns, which reach the
    reward functions as keyword lists (e.g. 'answer' for exact_match)."""

    learning_rate: float = _f(3e-6, "Peak learning rate of AdamW.", gt=0)
    per_device_train_batch_size: int = _f(16, "Prompts per process per RL step (each gives one rollout in "
                                              "PPO, num_generations in GRPO).", ge=1)
    max_new_tokens: int = _f(64, "Maximum tokens generated per completion (TRL: max_completion_length / "
                                 "response_length); a completion without EOS by then is cut.", ge=1)
    temperature: float = _f(1.0, "Sampling temperature; log-probabilities for the loss use the same one.", gt=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold (1: off). Log-probabilities stay those of the untruncated "
                           "tempered distribution, so leave it at 1 for exact on-policy ratios.", gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling (0: off); same caveat as top_p.", ge=0)
    missing_eos_penalty: float = _f(0.0, "Subtracted from the reward of a completion that reached "
                                         "max_new_tokens without EOS (TRL name; 0: off).", ge=0)
    reward_model: str = _f("", "Reward-model directory (saved by `align rm`) used as a reward source, named "
                               "'reward_model' in the logs.")
    reward_funcs: list = _f([], "Reward functions: built-in names (exact_match, number_match, format_digits, "
                                "length_penalty), path/to/file.py:function or module:function; each receives "
                                "prompts, completions and the prompt data's other columns.")
    reward_weights: list = _f([], "Weights of the reward sources in order: reward_model (if set) then "
                                  "reward_funcs (default: 1 each).")
    gold_reward_funcs: list = _f([], "Reward functions that are logged (gold_<name>) but never trained on, to "
                                     "watch proxy-vs-gold over-optimisation; also used for greedy eval on "
                                     "eval_data (e.g. exact_match).")
    ref_model: str = _f("", "Frozen reference policy for the KL penalty (default: model). With use_lora the "
                            "reference is model with the adapter disabled: no second copy of the weights.")
    share_base: bool = _f(True, "With use_lora: one copy of the base weights for the policy, the reference, a "
                                "critic (PPO; REINFORCE and TRPO when psi needs values) and the reward model, each "
                                "a LoRA adapter of its own (with its head) on the policy's base, when reward_model "
                                "and the critic's source are model itself or LoRA adapters trained on it (`align "
                                "rm --use_lora`); the others keep separate copies (one log line says which). Not "
                                "for a reward model that trains (GRPO's rm_update). false: separate copies.")
    frozen_dtype: str = _f("auto", FROZEN_DTYPE_HELP, choices=DTYPE_CHOICES)
    beta: float = _f(0.05, "KL penalty coefficient (TRL's PPO calls it kl_coef); 0 disables the penalty.", ge=0)
    kl_estimator: str = _f("k1", "Per-token KL estimator: k1 (log-ratio, unbiased), k2 (half squared "
                                 "log-ratio), k3 (r - 1 - log r, unbiased and >= 0).", choices=("k1", "k2", "k3"))
    eval_max_samples: int = _f(0, "Greedy evaluation on eval_data uses only the first N prompts (0: all).", ge=0)
    max_tokens_per_micro_batch: int = _f(0, "PPO, GRPO, REINFORCE: cut each update into micro-batches of at most "
                                            "this many tokens (rows x the longest row's prompt + completion, the "
                                            "rows ordered by length; a longer row is a micro-batch alone) instead "
                                            "of gradient_accumulation_steps equal parts: the same gradient, a "
                                            "peak activation memory that follows the budget (veRL's "
                                            "ppo_max_token_len_per_gpu). 0: off.", ge=0)


@dataclass
class PPOConfig(RLConfig):
    """PPO with a value model, GAE and a KL penalty to a frozen reference (InstructGPT-style RLHF).

    A step generates per_device_train_batch_size rollouts per process, scores them, then runs num_ppo_epochs
    passes over them in num_mini_batches minibatches (one optimizer update each; gradient_accumulation_steps
    splits a minibatch into micro-batches). The PPO-paper variants are settings:
    clipping only (default); KL penalty in the objective with fixed beta (use_clipping=false, kl_in=loss,
    kl_to=old); adaptive beta (same with kl_controller=doubling); neither (use_clipping=false, beta=0)."""

    num_ppo_epochs: int = _f(4, "Passes over each batch of rollouts.", ge=1)
    num_mini_batches: int = _f(1, "Minibatches (optimizer updates) per pass over the rollouts.", ge=1)
    cliprange: float = _f(0.2, "Policy ratio clip range epsilon (TRL name; GRPO calls it epsilon).", gt=0)
    use_clipping: bool = _f(True, "Clip the policy ratio (false: plain importance-weighted objective).")
    cliprange_value: float = _f(0.2, "Clip range of the value prediction around the rollout values (0: off).", ge=0)
    vf_coef: float = _f(0.1, "Weight of the value loss.", ge=0)
    gamma: float = _f(1.0, "Discount factor of GAE.", ge=0, le=1)
    lam: float = _f(0.95, "GAE lambda: 1 gives Monte-Carlo returns minus the baseline, 0 the TD residual.", ge=0, le=1)
    whiten_advantages: bool = _f(True, "Normalise advantages to mean 0, std 1 over the batch's tokens.")
    entropy_coef: float = _f(0.0, "Weight of the entropy bonus (subtracted from the loss).", ge=0)
    target_approx_kl: float = _f(0.0, "Stop a step's epoch loop once the mean approximate KL(pi_old || pi) of "
                                      "the updates so far exceeds this (0: never).", ge=0)
    kl_in: str = _f("reward", "Where the KL penalty goes: reward (per-token -beta*KL added to the reward, "
                              "InstructGPT) or loss (beta*KL added to the objective, PPO paper / GRPO).",
                    choices=("reward", "loss"))
    kl_to: str = _f("ref", "What the KL is measured against: ref (the frozen reference policy) or old (the "
                           "policy that sampled the rollouts: the PPO paper's KL[pi_old, pi]; needs kl_in=loss).",
                    choices=("ref", "old"))
    kl_controller: str = _f("fixed", "How beta changes: fixed; adaptive (Ziegler et al. 2019: proportional "
                                     "control toward target_kl over kl_horizon rollouts); doubling (PPO paper: "
                                     "beta*2 when KL > 1.5*target_kl, beta/2 when KL < target_kl/1.5).",
                            choices=("fixed", "adaptive", "doubling"))
    target_kl: float = _f(6.0, "KL target of the adaptive/doubling controllers: nats per completion (sum over "
                               "its tokens) for kl_to=ref, nats per token for kl_to=old (as in the PPO paper).", gt=0)
    kl_horizon: int = _f(10000, "Horizon (in rollouts) of the adaptive controller.", ge=1)
    value_model: str = _f("", "Critic: a model directory or hub id (a reward model keeps its head, a causal LM "
                              "gets a new one), or 'policy' for a value head on the policy's trunk (half the "
                              "compute, but the value loss then trains the policy's weights too: keep rewards "
                              "near unit scale or vf_coef small); default: reward_model when set, else model.")


@dataclass
class PolicyGradientConfig(RLConfig):
    """Fields shared by the vanilla policy-gradient stages (REINFORCE, TRPO): which Ψ_t weighs each token's
    ∇ log π in ``g = E[Σ_t Ψ_t ∇ log π(a_t|s_t)]``, and the critic when Ψ needs one.

    Per-token rewards are the sequence's score at its last token and −beta·KL(π‖π_ref) at every token (as PPO's
    kl_in=reward). Ψ needs critic values for baseline=value with psi=reward_to_go_baseline, for gae and for
    td_residual; the critic is then fitted by regression on Monte-Carlo rewards-to-go (on GAE returns for gae)."""

    num_generations: int = _f(1, "Completions sampled per prompt (TRL name); each step has "
                                 "per_device_train_batch_size x num_generations rollouts per process. "
                                 "baseline=group_mean needs >= 2.", ge=1)
    psi: str = _f("reward_to_go_baseline", "Psi_t, the weight of each token's grad log-prob: return (the total "
                                           "return), reward_to_go, reward_to_go_baseline (reward-to-go minus "
                                           "`baseline`), q_value (the critic's Q(s_t, a_t) = r_t + gamma "
                                           "V_{t+1}), gae (GAE advantage), td_residual (r_t + gamma V_{t+1} - V_t).",
                  choices=("return", "reward_to_go", "reward_to_go_baseline", "q_value", "gae", "td_residual"))
    baseline: str = _f("batch_mean", "Baseline of psi=reward_to_go_baseline: value (the critic's V(s_t)), "
                                     "batch_mean (mean return of the process's batch) or group_mean (mean return "
                                     "of the prompt's num_generations completions).",
                       choices=("value", "batch_mean", "group_mean"))
    gamma: float = _f(1.0, "Discount factor of returns, rewards-to-go, TD residuals and GAE.", ge=0, le=1)
    lam: float = _f(0.95, "GAE lambda (psi=gae only).", ge=0, le=1)
    whiten_advantages: bool = _f(False, "Normalise Psi to mean 0, std 1 over the batch's tokens.")
    loss_agg: str = _f("seq-mean-token-sum", "How per-token terms become the loss: seq-mean-token-sum (the "
                                             "textbook estimator: sum over a trajectory, mean over "
                                             "trajectories), token-mean, seq-mean-token-mean or "
                                             "seq-mean-token-sum-norm.",
                       choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                "seq-mean-token-sum-norm"))
    value_model: str = _f("", "Critic when psi needs values: a model directory or hub id (a reward model keeps "
                              "its head, a causal LM gets a new one), 'policy' for a value head on the policy's "
                              "trunk; default: reward_model when set, else model.")
    vf_coef: float = _f(0.1, "Weight of the critic's regression loss in REINFORCE's joint loss (TRPO fits the "
                             "critic on its own, see vf_iters).", ge=0)


@dataclass
class ReinforceConfig(PolicyGradientConfig):
    """Vanilla policy gradient (REINFORCE, Williams 1992) with Psi chosen by name: one on-policy AdamW update of
    ``-agg(Psi_t log pi(a_t|s_t)) + vf_coef * value loss`` per batch of rollouts."""

    learning_rate: float = _f(1e-5, "Peak learning rate of AdamW.", gt=0)


@dataclass
class TRPOConfig(PolicyGradientConfig):
    """Trust region policy optimisation (Schulman et al. 2015): maximise the surrogate E[pi/pi_old * A] subject
    to the mean per-token KL(pi_old || pi) <= max_kl, with the natural-gradient direction from conjugate gradient
    on Fisher-vector products, the largest step the quadratic KL model allows, and a backtracking line search.

    The policy is moved by that step only (learning_rate, the AdamW fields and max_grad_norm apply to the critic
    alone); its trainable parameters are all of them, or the LoRA adapters with use_lora."""

    learning_rate: float = _f(1e-4, "Peak learning rate of the critic's AdamW (the policy takes TRPO steps).", gt=0)
    whiten_advantages: bool = _f(False, "Normalise Psi to mean 0, std 1 over the batch's tokens. The TRPO step "
                                        "does not depend on Psi's scale (delta sets the length), only the mean "
                                        "shift changes it.")
    loss_agg: str = _f("token-mean", "How the surrogate averages its tokens (the KL constraint is always a "
                                     "token mean): token-mean, seq-mean-token-mean, seq-mean-token-sum or "
                                     "seq-mean-token-sum-norm.",
                       choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                "seq-mean-token-sum-norm"))
    max_kl: float = _f(0.01, "Trust-region radius delta: the largest mean per-token KL(pi_old || pi) of a step.", gt=0)
    cg_iters: int = _f(10, "Conjugate-gradient iterations (Fisher-vector products) per step.", ge=1)
    cg_damping: float = _f(0.1, "Damping lambda added to the Fisher matrix: (F + lambda I) x = g.", ge=0)
    cg_residual_tol: float = _f(1e-10, "Stop conjugate gradient once the squared residual is below this.", ge=0)
    fisher_product: str = _f("gauss_newton", "How the conjugate gradient multiplies by the Fisher matrix: "
                                              "gauss_newton (J^T (diag p - p p^T) J v: a Jacobian-vector and a "
                                              "vector-Jacobian product, no second derivatives; faster) or "
                                              "kl_hessian (double backward of the mean KL; the reference). Equal "
                                              "at the policy that sampled.", choices=("gauss_newton", "kl_hessian"))
    fisher_fraction: float = _f(1.0, "Fraction of each batch's rollouts (evenly spaced) on which the Fisher-vector "
                                     "products are computed; < 1 makes each conjugate-gradient iteration that much "
                                     "cheaper (the gradient and the line search use every rollout).", gt=0, le=1)
    line_search_steps: int = _f(10, "Candidate steps of the backtracking line search (full step, then "
                                     "shrunk by backtrack_ratio each time).", ge=1)
    backtrack_ratio: float = _f(0.5, "Factor by which the line search shrinks a rejected step.", gt=0, lt=1)
    accept_ratio: float = _f(0.1, "A step must improve the surrogate by more than 0 and by at least this "
                                  "fraction of the linear prediction g.step.", ge=0)
    kl_tolerance: float = _f(0.0, "A step is accepted with KL up to max_kl * (1 + kl_tolerance).", ge=0)
    vf_iters: int = _f(4, "AdamW passes of the critic's regression over each batch of rollouts.", ge=1)


@dataclass
class GRPOConfig(RLConfig):
    """GRPO (Shao et al. 2024): num_generations completions per prompt, advantages relative to the prompt's group,
    the clipped ratio objective with an optional k3 KL to a reference in the loss; no value model.

    Batch sizes count completions, as in TRL: a step samples per_device_train_batch_size x
    gradient_accumulation_steps completions per process (that many / num_generations prompts, each prefilled once
    and its KV cache expanded to the group), then makes num_iterations optimizer updates on them, each over all of
    them in gradient_accumulation_steps micro-batches. The learning-rate schedule counts steps (rollout batches),
    so max_steps counts rollout batches as in PPO (with num_iterations=1 it is also TRL's optimizer-step count).

    Iterative GRPO (DeepSeekMath, Algorithm 1): ref_update_every resets the reference to the current policy;
    rm_update keeps the reward model training on comparisons ranked by rm_label_funcs within each group, mixed
    with replayed original comparisons."""

    per_device_train_batch_size: int = _f(16, "Completions (not prompts) per process per micro-batch, as in TRL; "
                                              "a multiple of num_generations.", ge=1)
    num_generations: int = _f(8, "Completions sampled per prompt: the group size G (>= 2).", ge=2)
    beta: float = _f(0.0, "Coefficient of the KL(pi || pi_ref) term in the loss; 0 (TRL's default) loads no "
                          "reference model at all. DeepSeekMath used 0.04.", ge=0)
    kl_estimator: str = _f("k3", "Per-token KL estimator in the loss: k3 (r - 1 - log r, GRPO's), k1 or k2.",
                           choices=("k1", "k2", "k3"))
    epsilon: float = _f(0.2, "Lower clip range of the ratio: clip(ratio, 1 - epsilon, 1 + epsilon_high).", gt=0)
    epsilon_high: float = _f(0.0, "Upper clip range (DAPO's clip-higher, e.g. 0.28); 0 means equal to epsilon.", ge=0)
    num_iterations: int = _f(1, "Optimizer updates per batch of rollouts (mu); the ratio's denominator stays the "
                                "log-probabilities recorded while sampling.", ge=1)
    loss_type: str = _f("dapo", "How per-token losses are averaged (TRL names, or our aggregate modes): dapo = "
                                "token-mean over the step's batch; grpo = seq-mean-token-mean; dr_grpo = "
                                "seq-mean-token-sum-norm (sum over tokens / max_new_tokens, mean over "
                                "sequences); or token-mean, seq-mean-token-mean, seq-mean-token-sum, "
                                "seq-mean-token-sum-norm.",
                        choices=("dapo", "grpo", "dr_grpo", "token-mean", "seq-mean-token-mean",
                                 "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    advantage: str = _f("zscore", "Group-relative advantage: zscore (R - mean) / (std + 1e-4) (DeepSeekMath); "
                                  "mean R - mean (Dr. GRPO); softmax exp(b R_i) / sum_j exp(b R_j) - 1/G with "
                                  "b = softmax_beta; leave_one_out R_i - mean of the others (RLOO).",
                        choices=("zscore", "mean", "softmax", "leave_one_out"))
    scale_rewards: str = _f("group", "Std that divides zscore advantages: group (each group's), batch (the whole "
                                     "step's rewards, all processes), none (no division: the same as "
                                     "advantage=mean). Other advantages take group or none.",
                            choices=("group", "batch", "none"))
    softmax_beta: float = _f(1.0, "Temperature beta of advantage=softmax (larger: sharper weight on the best).", gt=0)
    ref_update_every: int = _f(0, "Iterative GRPO: every N steps the reference becomes the current policy "
                                  "(needs beta > 0; with use_lora a frozen copy of its adapter on the same base "
                                  "weights); 0 never.", ge=0)
    rm_update: bool = _f(False, "Iterative GRPO: keep training reward_model during RL on comparisons made from "
                                "each group (completions that rm_label_funcs rank apart), one AdamW step per "
                                "RL step; the trained model is saved in output_dir/reward_model.")
    rm_label_funcs: list = _f([], "Verifier / gold functions that rank a group's completions for new reward-model "
                                  "comparisons (e.g. exact_match); default: gold_reward_funcs.")
    rm_replay_data: str = _f("", "Original comparisons (prompt+chosen+rejected or ranked responses; comma-"
                                 "separated files) replayed in every reward-model update.")
    rm_replay_ratio: float = _f(0.1, "Fraction of each reward-model update's comparisons drawn from "
                                     "rm_replay_data (DeepSeekMath replays 10% historical data); in [0, 1).",
                                ge=0, lt=1)
    rm_learning_rate: float = _f(1e-5, "Learning rate of the reward model's AdamW during rm_update.", gt=0)


# ---------------------------------------------------------------------------------------------------------------
# direct preference optimisation


@dataclass
class DPOConfig(ComparisonConfig):
    """Direct preference optimisation (Rafailov et al. 2023) and its relatives: the policy is trained on
    comparisons (prompt + chosen + rejected, or prompt + ranked responses) against a frozen reference policy,
    no reward model and no sampling. loss_type picks the loss by TRL's names."""

    learning_rate: float = _f(1e-6, "Peak learning rate of AdamW.", gt=0)
    loss_type: str = _f("sigmoid", "Preference loss (TRL names): sigmoid (DPO), ipo (Azar et al. 2023), hinge "
                                   "(SLiC), robust (label-smoothed, Chowdhury et al. 2024), simpo (reference-free, "
                                   "length-normalised, Meng et al. 2024), orpo (odds-ratio term added to the SFT "
                                   "loss, no reference, Hong et al. 2024).",
                        choices=("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"))
    beta: float = _f(0.1, "Temperature beta of the implicit reward beta*log(pi/pi_ref) (ipo: tau, the "
                          "regularisation; simpo: the reward scale, ~2; orpo: lambda, the odds-ratio weight).", gt=0)
    label_smoothing: float = _f(0.0, "Probability that a pair's label is flipped (cDPO for sigmoid, robust's "
                                     "epsilon); in [0, 0.5).", ge=0, lt=0.5)
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (loss_type=simpo).", ge=0)
    rpo_alpha: float = _f(0.0, "Weight of the chosen response's mean token NLL added to the loss (RPO, Pang et "
                               "al. 2024); 0: off.", ge=0)
    reference_free: bool = _f(False, "Use a uniform reference (log pi_ref = 0): no reference model is loaded. "
                                     "simpo and orpo are always reference-free.")
    ref_model: str = _f("", "Frozen reference policy (default: model). With use_lora the reference is model with "
                            "the adapter disabled: no second copy of the weights.")
    frozen_dtype: str = _f("auto", FROZEN_DTYPE_HELP + " Here: a reference loaded beside the policy (ref_model, or "
                                   "precompute_ref_log_probs false); the cache of the default reference is computed "
                                   "by the policy itself.", choices=DTYPE_CHOICES)
    precompute_ref_log_probs: bool = _f(True, "Compute the reference's log-probabilities of the training data once "
                                              "before training and cache them in output_dir (an epoch then costs "
                                              "one policy forward/backward per comparison).")
    margin_column: str = _f("margin", "Column with a per-pair margin m subtracted inside the loss (sigmoid: "
                                      "-log sigmoid(beta*h - m)); rows without it use 0. Empty: ignore margins.")
    share_prompt: bool = _f(True, "Run each comparison's prompt once, its responses attending to it through a "
                                  "4-D attention mask (same log-probabilities as separate sequences, fewer "
                                  "tokens); off, or with flash-attention: separate padded sequences.")


@dataclass
class OnlineDPOConfig(RLConfig):
    """Online DPO (Guo et al. 2024, TRL's OnlineDPOTrainer): each step samples num_generations completions per
    prompt from the current policy, the reward sources rank them, and the DPO loss trains on best vs worst of
    each group (groups whose rewards are all equal give no pair) against the frozen reference."""

    learning_rate: float = _f(5e-7, "Peak learning rate of AdamW.", gt=0)
    per_device_train_batch_size: int = _f(8, "Prompts per process per micro-batch; each gives num_generations "
                                             "completions and at most one pair.", ge=1)
    num_generations: int = _f(2, "Completions sampled per prompt (>= 2); the best and the worst make the pair.", ge=2)
    loss_type: str = _f("sigmoid", "Preference loss (TRL names): sigmoid, ipo, hinge, robust, simpo, orpo "
                                   "(see `align dpo --help`).",
                        choices=("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"))
    beta: float = _f(0.1, "Temperature beta of the implicit reward beta*log(pi/pi_ref) (as in `align dpo`).", gt=0)
    label_smoothing: float = _f(0.0, "Probability that a pair's label is flipped (sigmoid, robust); in [0, 0.5).",
                                ge=0, lt=0.5)
    simpo_gamma: float = _f(0.5, "SimPO's target reward margin gamma (loss_type=simpo).", ge=0)
    rpo_alpha: float = _f(0.0, "Weight of the chosen completion's mean token NLL added to the loss; 0: off.", ge=0)
