"""lm-eval's HFLM over an in-memory model (imported only once lm-eval is known to be installed)."""
from __future__ import annotations

import torch
from lm_eval.models.huggingface import HFLM

from ..prefix import as_prefixed


class GlufxLM(HFLM):
    """HFLM for a plain, glufx-quantized or QFeP (PrefixedLM) model.

    HFLM tokenizes every request as the plain model reads it (BOS first, when the tokenizer adds one) and scores
    logits[i] as the prediction of token i + 1. A PrefixedLM holds that BOS in its prefix cache and returns logits for
    the tokens after it only, so `_model_call` feeds it the batch without the BOS column and shifts its logits back
    into place: both models then score exactly the same continuation tokens. The BOS position's own prediction
    (the first token after BOS) lives in the prefix and is not returned; it is only ever scored for an empty
    context, which none of the shipped tasks has, and is NaN so that any use shows.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 1, progress: bool = True):
        # HFLM re-ties the output head to the embedding of the model it is given. This model is already built: on a
        # tied model (Gemma) whose lm_head glufx quantized, that would hang an FP `weight` on the Int8Linear.
        model.tie_weights = lambda *args, **kwargs: None
        try:
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        finally:
            del model.tie_weights
        prefixed = as_prefixed(model)  # a PrefixedLM, one a loader attached, or either under torch.compile
        self.prefix_bos = prefixed.bos_token_id if prefixed is not None else None
        self.progress = progress

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.prefix_bos is None:
            return super()._model_call(inps, attn_mask, labels)
        starts = inps[:, 0] == self.prefix_bos
        if not bool(starts.any()):  # a tokenizer without BOS: the prefix comes before the user's tokens as they are
            return super()._model_call(inps, attn_mask, labels)
        if not bool(starts.all()):
            raise ValueError("a batch mixes rows with and without BOS (inputs longer than the model's maximum length "
                             "were left-truncated): evaluate this QFeP model with batch_size=1")
        logits = super()._model_call(inps[:, 1:], attn_mask, labels)
        return torch.cat([logits.new_full((logits.shape[0], 1, logits.shape[2]), float("nan")), logits], dim=1)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.progress)
