"""Distil a Gemma 4 assistant drafter against a frozen target, on the user's text.

What one training step does, for a batch of B token sequences of length L:

1. The target runs one parallel forward over each sequence (``target(tokens, Step, cache)``),
   which gives its final hidden state h at every position, its logits (the teacher) and, in
   the cache, the K/V the drafter reads (exactly what ``decode.target_kv`` hands the drafter
   at inference).
2. The drafter drafts from every position p = 1 .. L - S at once, as it would in a
   speculative round that starts at p: step 1 reads (embed(x_p), h_{p-1}) and the target's
   K/V at positions < p, and predicts token p + 1; steps 2 .. S stay at the same position p
   and read the drafter's own post-projected hidden state from the step before (as at
   inference) with the next token of the sequence, and predict tokens p + 2 .. p + S.
   The teacher for step s is the target's distribution at position p + s - 1, which is
   conditioned on exactly the tokens the drafter was fed (``feed="data"``, the default);
   ``feed="drafter"`` feeds the drafter's own greedy token instead, as it feeds itself at
   inference (the teacher then still conditions on the text's token where the two differ).
   Positions are vectorised as the query axis of one drafter call: queries at positions
   1 .. L - S attend the same K/V under a per-query mask (keys before the query, within the
   sliding window), so the K/V is never copied per position.
3. Loss: the mean over steps and positions of KL(target || drafter) over the full vocabulary.
   A drafter with the centroid head also learns to pick clusters: a cross-entropy of its
   centroid scores against the target's probability mass per cluster (the head scores only
   the tokens of its top clusters at inference, so the right cluster must rank high).

Memory is dominated by vocabulary-sized arrays, about (2 + 3 S) * B * L * V * 4 bytes: with
Gemma's 262k vocabulary keep B * L near 512 (about 7.5 GB at S = 4).

Acceptance is reported two ways. *Teacher-forced*: on held-out sequences, step s counts as
accepted when the drafter's argmax equals the target's, and positions count for step s + 1 only
while the text itself follows the target's greedy choice (so the drafter was fed what a greedy
round would feed it): a cheap estimate of greedy acceptance a_s. *Loop*: the real speculative
loop (``generate_batch(..., draft_tokens=k)``) on held-out prompts, greedy,
``Stats.acceptance_by_position``.

The package, in reading order: ``settings``, ``data`` (text -> token sequences), ``drafter``
(the drafter to start from, quantizing the target, saving), ``objective`` (the training
forward and its loss), ``evaluate`` (acceptance per draft position) and ``train`` (the loop,
checkpoints, the report). Its names are all here: ``from mlx_specdec.commands import distill
as D`` then ``D.distill(...)``.
"""

from ...errors import InputError
from ...loading import DTYPES
from .data import Data, DataError, read_documents
from .drafter import QUANT_BITS, hf_weights, new_drafter, quantize_target, save_drafter, scratch_config, start_drafter
from .evaluate import Acceptance, evaluate_loop, evaluate_teacher_forced
from .objective import TeacherPass, full_logits, loss_terms, teacher, teacher_forced_acceptance, unroll
from .settings import FEEDS, Settings
from .train import (CHECKPOINT_DIR, Progress, Report, Trainer, acceptances_as_dict, distill, read_checkpoint_state,
                    resume_drafter)

__all__ = [
    "CHECKPOINT_DIR", "DTYPES", "FEEDS", "QUANT_BITS", "Acceptance", "Data", "DataError", "InputError", "Progress",
    "Report", "Settings", "TeacherPass", "Trainer", "acceptances_as_dict", "distill", "evaluate_loop",
    "evaluate_teacher_forced", "full_logits", "hf_weights", "loss_terms", "new_drafter", "quantize_target",
    "read_checkpoint_state", "read_documents", "resume_drafter", "save_drafter", "scratch_config",
    "start_drafter", "teacher", "teacher_forced_acceptance", "unroll",
]
