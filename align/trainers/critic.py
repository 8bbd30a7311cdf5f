"""The critic of the RL stages that learn values (PPO; REINFORCE and TRPO when Ψ needs them): the policy and its
value model as one trained module, its values on a rollout, and saving both.

The critic is a separate scalar-head model (a reward model keeps its head, a causal LM gets a new one) or, with
``value_model: policy``, a linear value head on the policy's last hidden states.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from ..config import AlignError
from ..heads import load_trained_scalar_model, token_values
from ..models import SelectiveLM, disable_dropout, lm_parts, no_split_modules
from ..rollout import Rollout, scatter_tokens, sequence_inputs
from .loop import Run
from .outputs import files_renamed_into, gathered_state, push_final, save_model

Tensor = torch.Tensor


class PolicyAndValue(nn.Module):
    """The policy and its critic as one module (one optimizer, one DDP wrapper, one checkpoint): a separate
    scalar-head model (`critic`) or a linear value head on the policy's last hidden states (`value_head`). The
    forward computes logits and values only at the selected positions (those that predict a completion token,
    V_t being the value before token t)."""

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

    def forward(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor,
                position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (N, V), values (N,) float32) at the N selected positions of (B, T) inputs."""
        if self.value_head is not None:
            logits, hidden = self.policy(input_ids, select=select, attention_mask=attention_mask,
                                         position_ids=position_ids, return_hidden=True)
            return logits, self.value_head(hidden).squeeze(-1).float()
        logits = self.policy(input_ids, select=select, attention_mask=attention_mask, position_ids=position_ids)
        return logits, self.values(input_ids, select, attention_mask, position_ids)

    def values(self, input_ids: Tensor, select: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Values (N,) float32 at the selected positions, without the policy's output head."""
        if self.value_head is not None:
            backbone, _ = lm_parts(self.policy.model)
            out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                           use_cache=False)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            return self.value_head(hidden[select]).squeeze(-1).float()
        return token_values(self.critic, input_ids, attention_mask, position_ids)[select]

    def critic_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters that are not the policy's (the critic's, or the value head's)."""
        policy = set(id(p) for p in self.policy.parameters())
        return [p for p in self.parameters() if p.requires_grad and id(p) not in policy]


def critic_source(cfg) -> str:
    """Where the critic starts: ``cfg.value_model``, default reward_model when set, else model."""
    return cfg.value_model or cfg.reward_model or cfg.model


def with_critic(cfg, tokenizer, dtype: torch.dtype, policy: nn.Module) -> PolicyAndValue:
    """The policy and the critic of ``cfg.value_model`` (default: reward_model when set, else model; 'policy': a
    zero-initialised value head on the policy's trunk), with LoRA when ``cfg.use_lora``."""
    choice = critic_source(cfg)
    if choice == "policy":
        _, head = lm_parts(policy)
        value_head = nn.Linear(head.in_features, 1, dtype=dtype)
        nn.init.zeros_(value_head.weight)
        nn.init.zeros_(value_head.bias)
        return PolicyAndValue(policy, value_head=value_head)
    critic = load_trained_scalar_model(choice, cfg, dtype, tokenizer.pad_token_id)
    n_critic = critic.get_input_embeddings().num_embeddings
    n_policy = policy.get_input_embeddings().num_embeddings
    if n_critic != n_policy:
        raise AlignError(f"value_model {choice}: vocabulary of {n_critic} tokens, the policy has {n_policy}; "
                         f"the critic reads the policy's token ids, so it must share its tokenizer")
    disable_dropout(critic)
    return PolicyAndValue(policy, critic=critic)


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
            save_model(run, net.model, out_dir, tokenizer, full, "model.", cfg.model)
        else:
            save_model(run, net.policy.model, out_dir, tokenizer, full, "policy.model.", cfg.model)
            if net.critic is not None:
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
