"""The critic of the RL stages that learn values (PPO; REINFORCE and TRPO when Ψ needs them): the policy and its
value model as one trained module, its values on a rollout, and saving both.

The critic is a separate scalar-head model (a reward model keeps its head, a causal LM gets a new one) or, with
``value_model: policy``, a linear value head on the policy's last hidden states.

One base (PPO with ``use_lora`` and ``share_base``): when the critic starts from the policy's model itself or
from a LoRA adapter of a scalar model trained on it (a LoRA reward model), the critic is not a second copy of
the base weights but the policy's own base with a LoRA adapter of its own, 'critic', and a value head
(:class:`align.heads.SharedScalarModel`): ``base + critic`` for a causal LM, ``base + frozen reward-model
adapter + critic`` for a reward model (the reward model merged into its base plus a new adapter, as the
separate copy is). The policy's pass runs with its adapter 'default', the critic's pass with its adapters;
the switch never touches ``requires_grad`` (:func:`align.models.use_adapters`), so both passes of one forward
reach their own weights. :func:`plan_base_sharing` decides which roles share the base.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import AlignError
from ..heads import (SharedScalarModel, add_scalar_adapter, is_adapter_of, load_trained_scalar_model, new_score_head,
                     save_scalar_adapter, token_values)
from ..models import (LogprobRequest, SelectiveLM, adapter_parameters, add_lora_adapter, disable_dropout, lm_parts,
                      no_split_modules, only_adapter, same_model)
from ..rollout import Rollout, scatter_tokens, sequence_inputs
from .checkpoints import error_line
from .loop import Run
from .outputs import files_renamed_into, gathered_state, push_final, save_model, save_pretrained

CRITIC_ADAPTER = "critic"  # the critic's trainable adapter on the policy's base (one base)

Tensor = torch.Tensor


class PolicyAndValue(nn.Module):
    """The policy and its critic as one module (one optimizer, one DDP wrapper, one checkpoint): a separate
    scalar-head model (`critic`), a :class:`SharedScalarModel` (`critic`: adapters and a head on the policy's
    base weights; its trainable adapter is then a parameter of the policy's peft model, see
    `critic_parameters`) or a linear value head on the policy's last hidden states (`value_head`). The forward
    computes logits and values only at the selected positions (those that predict a completion token, V_t being
    the value before token t); with a shared critic it runs the base twice, with the policy's adapter and then
    with the critic's."""

    def __init__(self, policy: nn.Module, critic: nn.Module | None = None, value_head: nn.Linear | None = None):
        super().__init__()
        if (critic is None) == (value_head is None):
            raise ValueError("give exactly one of critic and value_head")
        self.policy = SelectiveLM(policy)
        self.critic = critic
        self.value_head = value_head

    @property
    def _no_split_modules(self) -> list[str]:
        """The block classes of the policy and the critic (FSDP's transformer auto-wrap shards them)."""
        return no_split_modules(self.policy.model, self.critic)

    def forward(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor, position_ids: Tensor,
                logprobs: LogprobRequest | None = None) -> tuple[Any, Tensor]:
        """(logits (N, V) — or `Logprobs` for a `LogprobRequest` — and values (N,) float32) at the N selected
        positions of (B, T) inputs."""
        if self.value_head is not None:
            out, hidden = self.policy(input_ids, select=select, attention_mask=attention_mask,
                                      position_ids=position_ids, return_hidden=True, logprobs=logprobs)
            return out, self.value_head(hidden).squeeze(-1).float()
        out = self.policy(input_ids, select=select, attention_mask=attention_mask, position_ids=position_ids,
                          logprobs=logprobs)
        return out, self.values(input_ids, select, attention_mask, position_ids)

    def values(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values (N,) float32 at the selected positions, without the policy's output head."""
        if self.value_head is not None:
            backbone, _ = lm_parts(self.policy.model)
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            return self.value_head(hidden[select]).squeeze(-1).float()
        return token_values(self.critic, input_ids, attention_mask, position_ids)[select]

    @property
    def shares_base(self) -> bool:
        """Whether the critic is adapters on the policy's base weights (:class:`SharedScalarModel`)."""
        return isinstance(self.critic, SharedScalarModel)

    def critic_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are not the policy's (the critic's, or the value head's); with one base,
        the critic's head and its trainable adapters on the policy's base."""
        if self.shares_base:
            own = [p for name in self.critic.adapters for p in adapter_parameters(self.policy.model, name)]
            return [p for p in [*self.critic.parameters(), *own] if p.requires_grad]
        policy = set(id(p) for p in self.policy.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in policy]


def critic_source(cfg) -> str:
    """Where the critic starts: ``cfg.value_model``, default reward_model when set, else model."""
    return cfg.value_model or cfg.reward_model or cfg.model


@dataclass
class BaseSharing:
    """Which models of a LoRA RL run are adapters on the policy's base weights (see :func:`plan_base_sharing`)."""

    reward_model: bool  # the reward model: the policy's frozen adapter 'reward' and a head
    critic: bool  # the critic: the policy's adapter 'critic' (+ a frozen starting adapter) and a head
    line: str  # one line that says what shares the base and what does not, and why


def plan_base_sharing(cfg, stage: str, sharded: bool, has_critic: bool) -> BaseSharing:
    """Which of the reward model and the critic of a ``use_lora`` run can run on the policy's base weights: the
    reward model when it is a LoRA adapter of a scalar model trained on ``cfg.model``
    (:func:`align.heads.is_adapter_of`); the critic when its source (:func:`critic_source`) is ``cfg.model``
    itself or such an adapter, and gradient checkpointing is off (its recomputation in the backward pass would
    run with whichever adapter is active then). Neither under DeepSpeed or FSDP1 (``sharded``): their engines
    gather a module's flat weights once per forward and backward of the whole module, and the policy's would
    be used by several models. FSDP2 (per-module gathers; the rollout runs inside `Run.full_weights`) and DDP
    share. The others keep their own copy, as without ``share_base``; ``line`` says which and why."""
    shared, separate = ["the policy", "the reference"], []
    if cfg.ref_model and not same_model(cfg.ref_model, cfg.model):
        shared, separate = ["the policy"], [f"the reference (ref_model {cfg.ref_model} is not model)"]
    why_all = "the weights are sharded by DeepSpeed or FSDP1" if sharded else ""
    rm = False
    if cfg.reward_model:
        rm = not why_all and is_adapter_of(cfg.reward_model, cfg.model)
        if rm:
            shared.append("the reward model (adapter 'reward')")
        else:
            why = why_all or f"{cfg.reward_model} is not a LoRA adapter of {cfg.model}"
            separate.append(f"the reward model ({why})")
    critic = False
    source = critic_source(cfg) if has_critic else "policy"  # "policy": no critic of its own
    if source != "policy":
        why = why_all or ("gradient_checkpointing is on: its recomputation would run with the wrong adapter"
                          if cfg.gradient_checkpointing else "")
        if not why and not (same_model(source, cfg.model) or is_adapter_of(source, cfg.model)):
            why = f"{source} is neither model nor a LoRA adapter of it"
        critic = not why
        if critic:
            shared.append("the critic (adapter 'critic')")
        else:
            separate.append(f"the critic ({why})")
    line = f"{stage}: one copy of the base weights for {_words(shared)}"
    if separate:
        line += f"; separate copies for {_words(separate)}"
    return BaseSharing(rm, critic, line)


def _words(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def with_critic(cfg, tokenizer, dtype: torch.dtype, policy: nn.Module, share_base: bool = False) -> PolicyAndValue:
    """The policy and the critic of ``cfg.value_model`` (default: reward_model when set, else model; 'policy': a
    zero-initialised value head on the policy's trunk), with LoRA when ``cfg.use_lora`` (the new adapter drawn
    from ``cfg.seed + 1``). ``share_base`` (checked by :func:`plan_base_sharing`): the critic is adapters and a
    head on the policy's base weights (:func:`shared_critic`)."""
    choice = critic_source(cfg)
    if choice == "policy":
        _, head = lm_parts(policy)
        value_head = nn.Linear(head.in_features, 1, dtype=dtype)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        return PolicyAndValue(policy, value_head=value_head)
    if share_base:
        return PolicyAndValue(policy, critic=shared_critic(cfg, policy, dtype))
    critic = load_trained_scalar_model(choice, cfg, dtype, tokenizer.pad_token_id, lora_seed=cfg.seed + 1)
    n_critic = critic.get_input_embeddings().num_embeddings
    n_policy = policy.get_input_embeddings().num_embeddings
    if n_critic != n_policy:
        raise AlignError(f"value_model {choice}: vocabulary of {n_critic} tokens, the policy has {n_policy}; "
                         f"the critic reads the policy's token ids, so it must share its tokenizer")
    disable_dropout(critic)
    return PolicyAndValue(policy, critic=critic)


def shared_critic(cfg, policy: nn.Module, dtype: torch.dtype) -> SharedScalarModel:
    """The critic as adapters on the policy's base weights (``policy``: a causal-LM peft model): a new trainable
    LoRA adapter 'critic' (cfg's LoRA settings, drawn from ``cfg.seed + 1``) and a value head; from a reward
    model's adapter, on top of that adapter (frozen, shared with the reward model when it is the same) with a
    trainable copy of its head; from the model itself, with a new head from ``cfg.seed``. The same function as
    the separate copy of :func:`with_critic` (up to float rounding: the starting adapter is not merged)."""
    source = critic_source(cfg)
    if same_model(source, cfg.model):
        start, head = [], new_score_head(policy, cfg.seed, dtype)
    else:
        name, frozen_head = add_scalar_adapter(policy, source, "critic_init")
        start, head = [name], copy.deepcopy(frozen_head)
    head.requires_grad_(True)
    add_lora_adapter(policy, CRITIC_ADAPTER, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                     seed=cfg.seed + 1)
    disable_dropout(policy)  # the new adapter's dropout (the separate critic has none either)
    return SharedScalarModel(policy, [*start, CRITIC_ADAPTER], head)


def policy_of(net: nn.Module) -> SelectiveLM:
    """The policy (a SelectiveLM) of a trained module: the module itself, or the policy of a PolicyAndValue."""
    return net.policy if isinstance(net, PolicyAndValue) else net


def rollout_values(net: PolicyAndValue, r: Rollout) -> Tensor:
    """The critic's values V_t (B, C) float32 of a rollout's completion tokens, 0 where masked."""
    inp = sequence_inputs(r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)
    v = net.values(inp["input_ids"], inp["select"], inp["attention_mask"], inp["position_ids"])
    return scatter_tokens(v.float(), r.completion_mask)


def save_policy_and_critic(run: Run, tokenizer, push: bool = True) -> None:
    """The policy (or its LoRA adapter) and tokenizer in output_dir with save_pretrained; a separate critic in
    output_dir/value_model; a value head on the policy trunk in output_dir/value_head.safetensors. With
    ``merge_lora``, the policy's and the critic's adapters are merged into their bases (full models); with
    ``push_to_hub`` (and `push`), output_dir is then uploaded."""
    from safetensors.torch import save_file

    out_dir = run.cfg.output_dir
    run.accelerator.wait_for_everyone()
    full = gathered_state(run)  # collective: every process calls it
    if run.is_main:
        net = run.unwrap()
        cfg = run.cfg
        if not isinstance(net, PolicyAndValue):
            with _policy_adapter_only(net.model):
                save_model(run, net.model, out_dir, tokenizer, full, "model.", cfg.model)
        else:
            with _policy_adapter_only(net.policy.model):
                save_model(run, net.policy.model, out_dir, tokenizer, full, "policy.model.", cfg.model)
            if net.shares_base:
                save_shared_critic(run, net.critic, os.path.join(out_dir, "value_model"), tokenizer,
                                   critic_source(cfg), full)
            elif net.critic is not None:
                save_model(run, net.critic, os.path.join(out_dir, "value_model"), tokenizer, full, "critic.",
                           critic_source(cfg))
            else:
                head = {k[len("value_head."):]: v for k, v in full.items() if k.startswith("value_head.")} \
                    if full else net.value_head.state_dict()
                with files_renamed_into(out_dir) as tmp:  # written whole or not at all
                    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()},
                              os.path.join(tmp, "value_head.safetensors"))
    run.accelerator.wait_for_everyone()
    if push:
        push_final(run)


def _policy_adapter_only(model: nn.Module) -> contextlib.AbstractContextManager:
    """A policy with other adapters on its base (the reward model's, the critic's) saves its own alone."""
    return only_adapter(model, "default") if len(getattr(model, "peft_config", None) or {}) > 1 \
        else contextlib.nullcontext()


def save_shared_critic(run: Run, critic: SharedScalarModel, out_dir: str, tokenizer, base: str,
                       full: dict[str, Tensor] | None = None) -> None:
    """On the main process: a one-base critic saved as the separate critic would be, a LoRA adapter of a scalar
    model on ``base`` (the critic's source) with its head, and the tokenizer (:func:`save_scalar_adapter`); with
    ``merge_lora``, merged into ``base`` instead (a full scalar model). ``full``: the gathered state dict of the
    prepared `PolicyAndValue` when it is sharded (FSDP2)."""
    from ..export import ADAPTER_FILES, merge_saved_adapter

    states = {}
    if full:  # the host is the policy's model ("policy.model."), the head the critic's ("critic.score.")
        states = {key: {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}
                  for key, prefix in (("host_state", "policy.model."), ("head_state", "critic.score."))}
    try:
        if not run.cfg.merge_lora:
            with files_renamed_into(out_dir) as tmp:  # written whole or not at all
                save_scalar_adapter(critic, CRITIC_ADAPTER, base, tmp, **states)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
            return
        os.makedirs(out_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".adapter-", dir=out_dir)
        try:
            save_scalar_adapter(critic, CRITIC_ADAPTER, base, tmp, **states)
            merged = merge_saved_adapter(tmp, base, tokenizer, run.weights_dtype, run.cfg.trust_remote_code)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise AlignError(f"{out_dir}: cannot save the critic ({error_line(e)}); the run's checkpoints are kept "
                         f"(--resume_from_checkpoint latest finishes the run and saves again)") from None
    for name in ADAPTER_FILES:  # an earlier adapter save here would make loaders take the folder for an adapter
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    save_pretrained(merged, out_dir, tokenizer, None, "")
