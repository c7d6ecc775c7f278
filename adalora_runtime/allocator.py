"""Importance scores, the cubic global budget schedule, and masking (the AdaLoRA rank allocator).

Given the same parameters and gradients, the scores, budgets and masks equal PEFT's RankAllocator
(tests/test_allocator.py checks it); unlike PEFT, the whole state is saved in checkpoints.
"""

from __future__ import annotations

import torch

from adalora.config import AdaLoraConfig
from adalora.inject import AdapterSet

FACTORS = ("P", "lam", "Q")


def budget_schedule(step: int, b0: int, bT: int, tinit: int, tfinal: int, total_step: int, deltaT: int) -> tuple[int, bool]:
    """(budget, whether to re-mask at this step): b0 until tinit, cubic decay, bT for the last tfinal steps."""
    if step <= tinit:
        return b0, False
    if step > total_step - tfinal:
        return bT, True
    progress = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((b0 - bT) * progress**3 + bT), step % deltaT == 0


def keep_mask(scores: torch.Tensor, costs: torch.Tensor, budget: int) -> torch.Tensor:
    """Keep the highest scores whose summed cost fits the budget; ties at the cut are all dropped.

    With unit costs this is PEFT's rule: drop every score <= the (n - budget)-th smallest.
    """
    order = torch.argsort(scores, descending=True, stable=True)
    fits = torch.cumsum(costs[order], 0) <= budget  # (n,) a prefix of True
    n_fit = int(fits.sum())
    if n_fit == scores.numel():
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores[order[n_fit]]
    return scores > threshold


class RankAllocator:
    """Sensitivity EMAs per entry and the global top-budget mask over all triplets.

    Call `step(global_step)` once per optimizer step, after backward and before zero_grad.
    """

    def __init__(self, adapters: AdapterSet, config: AdaLoraConfig | None = None) -> None:
        self.adapters = adapters
        self.config = config or adapters.config
        self.layers = adapters.layers
        self.paths = list(self.layers)
        use_params = self.config.budget is not None
        cost = adapters.triplet_costs()
        self.unit = {path: (cost[path] if use_params else 1) for path in self.paths}
        self.init_budget = sum(self.layers[p].rank * self.unit[p] for p in self.paths)
        self.target_budget = int(self.config.budget) if use_params else int(self.config.target_r * len(self.paths))
        self.ema_ipt: dict[str, torch.Tensor] = {}
        self.ema_unc: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {
            p: torch.ones(self.layers[p].rank, dtype=torch.bool, device=self.layers[p].lam.device) for p in self.paths
        }
        self.budget = self.init_budget

    def _param(self, path: str, factor: str) -> torch.Tensor:
        return getattr(self.layers[path], factor)

    @torch.no_grad()
    def update_importance(self) -> None:
        """I = |w * grad|; Ibar = b1 Ibar + (1-b1) I; Ubar = b2 Ubar + (1-b2) |I - Ibar|."""
        b1, b2 = self.config.beta1, self.config.beta2
        for path in self.paths:
            for factor in FACTORS:
                key = f"{path}.{factor}"
                p = self._param(path, factor)
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                ipt = (p * grad).abs()
                if key not in self.ema_ipt:
                    self.ema_ipt[key] = torch.zeros_like(p)
                    self.ema_unc[key] = torch.zeros_like(p)
                self.ema_ipt[key] = b1 * self.ema_ipt[key] + (1 - b1) * ipt
                self.ema_unc[key] = b2 * self.ema_unc[key] + (1 - b2) * (ipt - self.ema_ipt[key]).abs()

    def triplet_scores(self) -> dict[str, torch.Tensor]:
        """score(lam_i) + mean of score(P[:, i]) + mean of score(Q[i, :]), score = Ibar * Ubar."""
        out = {}
        for path in self.paths:
            s = {f: self.ema_ipt[f"{path}.{f}"] * self.ema_unc[f"{path}.{f}"] for f in FACTORS}
            out[path] = s["lam"].view(-1) + s["P"].mean(dim=0) + s["Q"].mean(dim=1)
        return out

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> None:
        scores = self.triplet_scores()
        flat = torch.cat([scores[p] for p in self.paths])
        costs = torch.cat([torch.full_like(scores[p], float(self.unit[p])) for p in self.paths])
        keep = keep_mask(flat, costs, budget)
        offset = 0
        for path in self.paths:
            n = scores[path].numel()
            self.masks[path] = keep[offset:offset + n].clone()
            offset += n
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for path in self.paths:
            self.layers[path].lam.masked_fill_(~self.masks[path], 0.0)

    def step(self, global_step: int) -> int:
        """Update importance, re-mask on schedule, freeze the mask for the final phase. Returns the budget.

        Call after loss.backward() (and optimizer.step()) and before optimizer.zero_grad().
        """
        c = self.config
        final_step = c.total_step - c.tfinal
        if global_step < final_step:
            self.update_importance()
            budget, remask = budget_schedule(global_step, self.init_budget, self.target_budget, c.tinit, c.tfinal,
                                             c.total_step, c.deltaT)
            if remask:
                self.mask_to_budget(budget)
            self.budget = budget
        elif global_step == final_step:
            self.mask_to_budget(self.target_budget)
            self.budget = self.target_budget
            self.ema_ipt, self.ema_unc = {}, {}
        else:
            self.apply_masks()
        return self.budget

    def reached(self) -> dict:
        """Kept ranks and the adapter parameters they cost."""
        ranks = {p: int(self.masks[p].sum()) for p in self.paths}
        costs = self.adapters.triplet_costs()
        return {"ranks": ranks, "params": sum(ranks[p] * costs[p] for p in self.paths),
                "triplets": sum(ranks.values())}

    def state_dict(self) -> dict:
        return {
            "budget": self.budget,
            "ema_ipt": {k: v.clone() for k, v in self.ema_ipt.items()},
            "ema_unc": {k: v.clone() for k, v in self.ema_unc.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if set(state["masks"]) != set(self.paths):
            raise ValueError("allocator state belongs to a different set of adapted modules")
        device = {p: self.layers[p].lam.device for p in self.paths}
        owner = lambda key: key.rsplit(".", 1)[0]  # noqa: E731
        self.budget = int(state["budget"])
        self.ema_ipt = {k: v.to(device[owner(k)]) for k, v in state["ema_ipt"].items()}
        self.ema_unc = {k: v.to(device[owner(k)]) for k, v in state["ema_unc"].items()}
        self.masks = {k: v.to(device[k]).bool() for k, v in state["masks"].items()}
