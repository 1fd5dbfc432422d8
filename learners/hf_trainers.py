"""The TRL trainers of `cai train sft|rm|dpo`, built inside each Ray Train worker.

* sft: TRL's ``SFTTrainer`` on the ``messages`` column of SL-CAI data (and any other chat
  data given with more ``--data``), as prompt/completion so only the answer is learned;
* rm: a one-output sequence-classification head trained with the soft-label Bradley–Terry
  loss on ``prompt/chosen/rejected`` (+ ``chosen_prob``; 1 when absent), extending TRL's
  ``RewardTrainer``; pairwise accuracy on the held-out split (and the training pairs);
* dpo: TRL's ``DPOTrainer`` on ``prompt/chosen/rejected``.

Each ``build_*`` returns (trainer, tokenizer, measure) for :func:`learners.hf_loop.hf_train_loop`;
each ``*_loop`` is a job's Ray Train worker body. ``sft_data`` and ``rm_data`` also run on the
driver (``workflows/train.py``), so bad data fails before any worker starts.
"""

from __future__ import annotations

from typing import Any

from core.training_data import TrainingDataError, load_training_data, split
from learners.context import LearnerContext
from learners.hf_configs import PREFERENCE_COLUMNS, DPOConfig, RMConfig, SFTConfig, TrainJobConfig
from learners.hf_loop import evaluate_split, hf_train_loop
from learners.hf_sharding import FSDP_CONFIG, bf16_compute, fsdp_reference, trained_model, with_strategy
from learners.options import LoraOptions


def _common_args(cfg: TrainJobConfig, output_dir: str) -> dict[str, Any]:
    """The Hugging Face TrainingArguments every job shares."""
    opts, learner = cfg.training, cfg.learner
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=opts.batch_size,
        per_device_eval_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        learning_rate=learner.lr,
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps or -1,
        save_strategy="steps",
        save_steps=learner.save_steps,
        save_total_limit=2,
        logging_steps=opts.logging_steps,
        include_num_input_tokens_seen=True,  # tokens/s in metrics.jsonl and the Ray gauges
        eval_strategy="no",
        report_to=[] if opts.report_to == "none" else [opts.report_to],
        seed=learner.seed,
        data_seed=learner.seed,
        use_cpu=not learner.use_gpu,
        bf16=bf16_compute(learner),
        ddp_backend="nccl" if learner.use_gpu else "gloo",
        # under FSDP, recomputation is the plugin's (activation_checkpointing), which wraps each block
        **({"fsdp": True, "fsdp_config": {**FSDP_CONFIG, "activation_checkpointing": learner.gradient_checkpointing}}
           if learner.strategy == "fsdp" else
           {"gradient_checkpointing": learner.gradient_checkpointing,
            "gradient_checkpointing_kwargs": {"use_reentrant": False}}),
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def _peft_config(lora: LoraOptions):
    """peft's LoRA config for the TRL trainer (which wraps the model), or None: full fine-tuning."""
    from core.lora import lora_config

    return lora_config(lora.lora_r, lora.lora_alpha, lora.lora_targets) if lora.enabled else None


def _tokenizer(cfg: TrainJobConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- SFT ----------------------------------------------------------------------------------


def _to_prompt_completion(example: dict[str, Any]) -> dict[str, Any]:
    messages = example["messages"]
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def revision_examples(prompt: list[dict], revisions: list[dict]) -> list[list[dict]]:
    """One SFT conversation per revision round of an SL-CAI row: the prompt, then that
    round's revision as the answer (Bai et al. 2022 §3.1 trains on the revisions of every
    step, not the last one only)."""
    return [[*prompt, {"role": "assistant", "content": r["revision"]}] for r in revisions]


def sft_data(paths, targets: str = "all"):
    """``messages`` conversations from every source. With ``targets="all"``, a `cai generate`
    row (it has ``prompt`` and ``revisions``) gives one conversation per revision round."""
    import datasets

    def per_round(batch):
        out = []
        for messages, prompt, revisions in zip(batch["messages"], batch["prompt"], batch["revisions"]):
            out += revision_examples(prompt, revisions) if revisions else [messages]
        return {"messages": out}

    parts = []
    for path in paths:
        part = load_training_data([path], ["messages"], keep=("prompt", "revisions"))
        if targets == "all" and {"prompt", "revisions"} <= set(part.column_names):
            part = part.map(per_round, batched=True, remove_columns=part.column_names)
        parts.append(part.select_columns(["messages"]))
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    bad = [i for i, m in enumerate(data["messages"][:1000]) if not m or m[-1]["role"] != "assistant"]
    if bad:
        raise TrainingDataError(f"rows {bad[:5]} of the SFT data do not end with an assistant message")
    return data


def build_sft(cfg: SFTConfig, output_dir: str):
    import trl
    from transformers import AutoModelForCausalLM

    data = sft_data(cfg.data, cfg.sft_targets).map(_to_prompt_completion, remove_columns=["messages"])
    train, evaluation = split(data, cfg.training.eval_split, cfg.learner.seed)
    tokenizer = _tokenizer(cfg)
    model = trained_model(AutoModelForCausalLM, cfg)
    args = trl.SFTConfig(**_common_args(cfg, output_dir), max_length=cfg.training.max_length,
                         completion_only_loss=True)
    trainer = with_strategy(trl.SFTTrainer, cfg.learner)(model=model, args=args, train_dataset=train,
                                                         eval_dataset=evaluation, processing_class=tokenizer,
                                                         peft_config=_peft_config(cfg.lora))
    return trainer, tokenizer, evaluate_split


def sft_loop(context: LearnerContext[SFTConfig, None]) -> None:
    hf_train_loop(context, build_sft)


# -- reward model -------------------------------------------------------------------------


def _soft_label_trainer_class():
    """TRL's RewardTrainer with the soft-label loss. ``chosen_prob`` travels through TRL's
    collator in its ``margin`` slot (a per-pair float it already batches)."""
    import torch
    from trl import RewardTrainer

    from core.losses import soft_preference_loss

    class SoftLabelRewardTrainer(RewardTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            chosen_prob = inputs.pop("margin")
            inputs["use_cache"] = False
            outputs = model(**inputs)
            rewards_chosen, rewards_rejected = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_preference_loss(rewards_chosen, rewards_rejected, chosen_prob)
            with torch.no_grad():
                accuracy = (rewards_chosen > rewards_rejected).float().mean()
                self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
                margin = (rewards_chosen - rewards_rejected).mean()
                self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


def rm_data(paths):
    data = load_training_data(paths, PREFERENCE_COLUMNS, keep=("chosen_prob",))
    if "chosen_prob" in data.column_names:
        probs = data["chosen_prob"]
        outside = [i for i, p in enumerate(probs) if p is None or not 0.0 <= p <= 1.0]
        if outside:
            raise TrainingDataError(f"chosen_prob outside [0, 1] in rows {outside[:5]} (e.g. {probs[outside[0]]!r})")
        return data.rename_column("chosen_prob", "margin")
    return data.add_column("margin", [1.0] * len(data))  # hard labels: standard Bradley–Terry


def build_rm(cfg: RMConfig, output_dir: str):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig

    train, evaluation = split(rm_data(cfg.data), cfg.training.eval_split, cfg.learner.seed)
    tokenizer = _tokenizer(cfg)
    model = trained_model(AutoModelForSequenceClassification, cfg, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(**_common_args(cfg, output_dir), max_length=cfg.training.max_length,
                        center_rewards_coefficient=None)
    trainer = with_strategy(_soft_label_trainer_class(), cfg.learner)(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer
    )
    if len(trainer.train_dataset) == 0:  # TRL drops pairs longer than max_length
        raise TrainingDataError(f"every training pair is longer than --max-length {cfg.training.max_length} tokens")
    return trainer, tokenizer, measure_reward_model


def measure_reward_model(trainer) -> dict[str, float]:
    """Pairwise accuracy (chosen scored above rejected) on the held-out split and on the
    training pairs, from the model's rewards on each tokenized pair; and the mean and spread
    of its scores over the training answers (``train_reward_mean``: `--reward-center`)."""
    import torch
    from torch.utils.data import DataLoader

    from core.losses import pairwise_accuracy

    model = trainer.model
    was_training = model.training
    model.eval()
    metrics = {}
    for name, dataset in (("eval", trainer.eval_dataset), ("train", trainer.train_dataset)):
        if dataset is None or len(dataset) == 0:
            continue
        chosen, rejected = [], []
        loader = DataLoader(dataset.select_columns(["chosen_ids", "rejected_ids", "margin"]),
                            batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
        with torch.no_grad():
            for batch in loader:
                batch.pop("margin")
                batch = {k: v.to(model.device) for k, v in batch.items()}
                rewards = model(**batch).logits.squeeze(-1).float()
                c, r = torch.chunk(rewards, 2)
                chosen.append(c.cpu())
                rejected.append(r.cpu())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        metrics[f"{name}_pairwise_accuracy"] = pairwise_accuracy(chosen, rejected)
        if name == "train":  # what `cai train ppo --reward-center` subtracts from every score
            scores = torch.cat([chosen, rejected])
            metrics["train_reward_mean"] = scores.mean().item()
            metrics["train_reward_std"] = scores.std().item() if len(scores) > 1 else 0.0
    model.train(was_training)
    return metrics


def rm_loop(context: LearnerContext[RMConfig, None]) -> None:
    hf_train_loop(context, build_rm)


# -- DPO ----------------------------------------------------------------------------------


def build_dpo(cfg: DPOConfig, output_dir: str):
    import trl
    from transformers import AutoModelForCausalLM

    data = load_training_data(cfg.data, PREFERENCE_COLUMNS)
    train, evaluation = split(data, cfg.training.eval_split, cfg.learner.seed)
    tokenizer = _tokenizer(cfg)
    model = trained_model(AutoModelForCausalLM, cfg)
    # with LoRA the reference is the model with its adapters off; under DDP TRL loads it
    reference = fsdp_reference(cfg) if cfg.learner.strategy == "fsdp" and not cfg.lora.enabled else None
    args = trl.DPOConfig(**_common_args(cfg, output_dir), max_length=cfg.training.max_length, beta=cfg.beta)
    trainer = with_strategy(trl.DPOTrainer, cfg.learner)(model=model, ref_model=reference, args=args, train_dataset=train,
                                                         eval_dataset=evaluation, processing_class=tokenizer,
                                                         peft_config=_peft_config(cfg.lora))
    return trainer, tokenizer, evaluate_split


def dpo_loop(context: LearnerContext[DPOConfig, None]) -> None:
    hf_train_loop(context, build_dpo)
