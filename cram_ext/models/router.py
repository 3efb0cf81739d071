"""The router of a CRAM layer: which path each token takes, and how that choice is learned.

Paths (`Path`): the working memory alone, episodic attention, or the semantic adapter, each
added to the working-memory output with a hard 0/1 gate (B3).

The router predicts, for each path, the task loss the token will have if it takes that path
(a learned benefit predictor), and takes the path whose predicted loss plus price is lowest:
attention costs `λ_E` (in nats of the token's loss), semantic memory earns `λ_S·q̂`. The
predictions are regressed on the loss measured for the path that was taken; in training a
fraction `explore_rate` of the (token, layer) pairs takes a uniformly drawn path instead, so
every path's prediction stays measured (these are the probes of B5: the episodic ones count
in the attention fraction, and they keep q measured on tokens the router has moved off
attention).

Why not a straight-through Gumbel gate: it gives the episodic logit the slope of the loss at
the current gate value. On a row that does not attend that slope is 0 (its attention output
was never computed), so a token that leaves attention cannot come back; on a row that attends
it is the *marginal* value of scaling the retrieval, which goes to 0 as the network fits even
where attention is what answers, while the λ_E cost keeps pulling: trained longer, every query
left attention and novel-key accuracy fell to chance. A policy gradient (REINFORCE) on the
path choice does not collapse, but its softmax saturates: once every query attends with
π ≈ 1, recurring queries never learn that semantic memory answers them as well. A predicted
loss per path has neither problem: it is regressed on finite outcomes (a novel query without
attention loses log(n_values)), whatever the current choice. The loss predicted is the token's
own: a path's effect on other tokens (through later layers) is not credited.

With `counterfactual_probes` (a `ModelConfig` setting) training also measures, for tokens that
attended, the loss another path would have given them (`routing_loss` on a second forward
without gradient, `CRAMModel.counterfactual_routing_loss`): otherwise the other paths'
predictions for a query are measured only on the few that explore, and lag far behind what
semantic memory actually answers.

With `router_average_steps` (a `ModelConfig` setting) the paths are chosen by an exponential
moving average of the predictor's weights over about that many steps, as a target network is
in Q-learning; the predictor itself is what the regression trains. Observations cost about 0.01
nats on working or on semantic memory, and the two differ by less than a predictor regressed on
nats-sized query losses resolves, so whole token kinds moved between the two paths from one
evaluation to the next and the layers after them met inputs they were not trained on (on
SRCD's cpu preset a 400-step run ended with the dynamics MSE 22% above the same model with every
observation on semantic memory).

Inference takes the lowest-priced path and reads only what exists without running attention
(x_t, the time gap, the working-memory readout, q̂_t).
"""
from __future__ import annotations

import copy
import enum
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn


class Path(enum.IntEnum):
    """A router's choices, in the order of its loss predictions."""

    WORKING = 0
    EPISODIC = 1
    SEMANTIC = 2


@dataclass
class RoutingDecision:
    """One layer's routing of a batch; tensors are (batch, L) unless said otherwise."""

    choice: torch.Tensor           # int64 `Path` per token
    predicted_loss: torch.Tensor   # (batch, L, paths): the router's loss prediction per path
    scores: torch.Tensor           # (batch, L, paths): predicted loss + price; lowest is taken


class Router(nn.Module):
    """Per-token choice among `paths` (B3, B4) by predicted loss plus price.

    Features: x_t (the token content: without it no router can tell a query from an
    observation) and, unless the router is a static gate, log(1 + Δτ_t), the working-memory
    readout norm ‖y_t‖/√d and q̂_t; all detached: the router's regression shapes no
    representation. The predictor has one hidden layer: what attention is worth depends on
    the token's type *and* its key (a query on a novel key needs it, a write of that key or a
    query on a recurring key does not), which no linear function of the summed embeddings
    fits. Its `width` (hidden units, default d_model) bounds how fast it learns a label per key:
    a recurring key is worth moving off attention once semantic memory answers it, a novel key
    never. `episodic_bias` is the initial predicted-loss advantage of attention, so every token
    starts on it. With `average_steps` > 0 the choice is made by `predict_loss_average`, the
    moving average of `predict_loss` that `update_average` advances after each optimizer step.
    """

    def __init__(self, d_model: int, paths: Sequence[Path], reads_state: bool, reads_q: bool,
                 episodic_bias: float, width: Optional[int] = None, average_steps: int = 0):
        super().__init__()
        self.paths = tuple(paths)
        self.reads_state, self.reads_q = reads_state, reads_q
        n_features = d_model + (3 if reads_state else 0)
        width = width or d_model
        self.predict_loss = nn.Sequential(nn.Linear(n_features, width), nn.ReLU(),
                                          nn.Linear(width, len(self.paths)))
        with torch.no_grad():
            self.predict_loss[-1].weight.zero_()
            self.predict_loss[-1].bias.fill_(episodic_bias)
            self.predict_loss[-1].bias[Path.EPISODIC] = 0.0
        self.average_steps = average_steps
        self.predict_loss_average = (copy.deepcopy(self.predict_loss).requires_grad_(False)
                                     if average_steps > 0 else None)

    @property
    def deciding_predictor(self) -> nn.Sequential:
        """The loss predictor whose predictions choose the paths."""
        return self.predict_loss if self.predict_loss_average is None else self.predict_loss_average

    @torch.no_grad()
    def update_average(self) -> None:
        """Moves `predict_loss_average` 1/average_steps of the way to `predict_loss`."""
        if self.predict_loss_average is None:
            return
        for average, current in zip(self.predict_loss_average.parameters(),
                                    self.predict_loss.parameters()):
            average.lerp_(current, 1.0 / self.average_steps)

    def features(self, x, gap, working_out, q_hat):
        if not self.reads_state:
            return x.detach()
        state_norm = torch.linalg.vector_norm(working_out, dim=-1) / math.sqrt(x.shape[-1])
        q_feature = q_hat if self.reads_q else torch.zeros_like(q_hat)
        return torch.cat([x, torch.log1p(gap)[..., None], state_norm[..., None],
                          q_feature[..., None]], dim=-1).detach()

    def forward(self, x, gap, working_out, q_hat, episodic_price: float, semantic_reward: float,
                explore_rate: float = 0.0, attend_all: bool = False,
                path: Optional[torch.Tensor] = None) -> RoutingDecision:
        """Path of every token: the lowest predicted loss + price, where attention costs
        `episodic_price` and semantic memory earns `semantic_reward · q̂`; with `attend_all`,
        attention (the warm-up: attention learns to retrieve before the router may judge it).
        A fraction `explore_rate` of the tokens takes a uniformly drawn path instead
        (training). `path` (batch, L), if given, is taken as it is (a counterfactual pass)."""
        features = self.features(x, gap, working_out, q_hat)
        deciding = self.deciding_predictor(features)
        # Training regresses `predict_loss`; evaluation reports the predictions that decided.
        predicted = (self.predict_loss(features)
                     if self.training and self.predict_loss_average is not None else deciding)
        price = torch.zeros_like(predicted)
        price[..., Path.EPISODIC] = episodic_price
        if Path.SEMANTIC in self.paths:
            price[..., Path.SEMANTIC] = -semantic_reward * q_hat.detach()
        scores = deciding.detach() + price
        choice = (torch.full_like(scores[..., 0], Path.EPISODIC, dtype=torch.long) if attend_all
                  else scores.argmin(-1))
        if path is not None:
            choice = path
        elif explore_rate > 0:
            explore = torch.rand(choice.shape, device=choice.device) < explore_rate
            drawn = torch.randint_like(choice, len(self.paths))
            choice = torch.where(explore, drawn, choice)
        return RoutingDecision(choice, predicted, scores)


def routing_loss(decision: RoutingDecision, token_loss: torch.Tensor,
                 path: Optional[torch.Tensor] = None,
                 rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ over the layer's tokens (or over `rows`) of (the prediction for the path taken, or for
    `path`, − the token's measured task loss there)²: the regression that teaches the router
    what each path is worth. With `path` and `rows`, the counterfactual probes' regression: the
    tokens that attended measured another path in a second pass
    (`CRAMModel.counterfactual_routing_loss`)."""
    taken = decision.choice if path is None else path
    predicted = decision.predicted_loss.gather(-1, taken[..., None]).squeeze(-1)
    error = (predicted - token_loss.detach()).pow(2)
    return (error if rows is None else error * rows).sum()
