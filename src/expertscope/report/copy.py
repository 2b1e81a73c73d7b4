"""The report's fixed copy: the introduction, how to read the page, figure captions and column help."""

from __future__ import annotations

from .record import SATURATED

#: How to use the explorable page, said once at its top (report and comparison).
HOW_TO_READ = ("This file is self-contained and works offline: click a column header to sort, type in a table's "
               "box to filter, hover a heatmap cell for its value, and pick a domain at the top to show only its "
               "results.")

def report_intro(model: str, created: str) -> str:
    """The report's opening line."""
    return f"What gets activated: domain and driver experts of {model}. Generated {created}. {HOW_TO_READ}"

def compare_intro(models: list[str]) -> str:
    """The comparison's opening line."""
    return f"{', '.join(models)}, side by side. {HOW_TO_READ}"

#: What the report says of a whole section that has nothing to show.
NO_DRIVERS = "No expert passes the driver rule in any domain; see the findings above."

#: Steering in scale mode multiplies logits: the sign matters (docs/methods.md §5).
SCALE_NOTE = "Scale mode multiplies router logits by s: a negative logit scaled by s > 1 moves down, not up."

#: Figure captions, by figure name (the names :func:`~expertscope.report.figures.write_figures` returns).
CAPTIONS: dict[str, str] = {
    "fig1_cwas": "Figure 1. CWAS = (1 − H)·A of every expert, per layer and domain; stars mark domain experts, "
                 "the dotted line the uniform rate k/E.",
    "fig2_expert_types": "Figure 2. (a) Share of routed selections by expert type; (b) number of activated "
                         "experts of each type.",
    "fig3_causal_rate": "Figure 3. Causal rate per layer: the share of a domain's tokens whose selected experts "
                        "include a driver expert of that layer.",
    "fig4_positions": "Figure 4. Relative position t/T of tokens that select a driver expert at any layer, "
                      "against all tokens (baseline).",
    "fig5_expert_map": "Figure 5. t-SNE of expert representations ({rep}), KMeans clusters by colour, driver "
                       "experts as stars.",
    "fig6_causal_layers": "Figure 6. Causal effect (KL of the clean to the perturbed next-token distribution at "
                          "the decision positions) per layer: mean and largest over the experts.",
    "fig7_causal_heatmap": "Figures 7–9. Causal effect of every expert at every layer; darker is stronger, driver "
                           "experts boxed. Hover a cell for its value; the PNG and SVG for papers are in figures/.",
    "activation_heatmap": "Activation rate A of every expert at every layer; darker is more often selected, "
                          "domain experts boxed. Hover a cell for its value.",
    "fig_routing_mi": "Mutual information between the domain and the selected expert, per layer (bits; the "
                      "expert drawn uniformly from each token's selected set).",
    "fig_steering": "Accuracy under each steering condition (95% CIs); conditions without targets are not "
                    "applicable and not drawn.",
    "fig_steering_sweep": "Accuracy against the steering scale (and the number of targeted experts), shaded 95% "
                          "CIs.",
}

#: What a table column holds, shown when the reader points at its header (definitions: docs/methods.md).
COLUMN_HELP: dict[str, str] = {
    "domain": "the domain (data set) the row is about",
    "layer": "MoE layer index",
    "expert": "expert index within the layer",
    "activation_rate": "A: share of the domain's tokens that select the expert",
    "A_lo": "lower end of A's 95% bootstrap interval",
    "A_hi": "upper end of A's 95% bootstrap interval",
    "lift": "activation lift: A in this domain over its mean A in the other domains",
    "lift_lo": "lower end of the lift's 95% bootstrap interval",
    "lift_hi": "upper end of the lift's 95% bootstrap interval",
    "entropy": "H: routing entropy, the mean over the domain's tokens of h(p̃), bits",
    "cwas": "CWAS = (1 − H)·A",
    "specificity": "CWAS in this domain minus its mean in the other domains",
    "q_value": "Benjamini–Hochberg adjusted p-value of the rule's test",
    "is_domain_expert": "passes the domain-expert rule",
    "is_general": "activated above uniform in some domain, and neither a domain nor a driver expert",
    "is_driver": "passes the driver rule",
    "ce_mean": "causal effect CE: mean over inputs of KL(P‖Q) at the decision positions, Q with the expert's "
               "router logit raised, nats",
    "ce_lo": "lower end of the CE's 95% bootstrap interval",
    "ce_hi": "upper end of the CE's 95% bootstrap interval",
    "layer_median": "median CE of the layer's experts",
    "ratio": "CE over the layer's median CE",
    "n_inputs": "inputs perturbed",
    "causal_rate": "share of the domain's tokens that select a driver expert of the layer",
    "mi_bits": "I(domain; selected expert), bits",
    "accuracy": "accuracy on the domain's test items",
    "ci_low": "lower end of the 95% interval",
    "ci_high": "upper end of the 95% interval",
    "delta": "change in accuracy against the unsteered model",
    "delta_lo": "lower end of the change's 95% paired-bootstrap interval",
    "delta_hi": "upper end of the change's 95% paired-bootstrap interval",
    "saturated": f"unsteered accuracy at or above the saturation threshold ({SATURATED} by default)",
    "n_targets": "experts steered",
    "n": "test items",
    "trigger_share": "share of the driver-triggering tokens in this position bin",
    "token_share": "share of all tokens in this position bin",
    "p_expert_given_token": "P(expert | token)",
    "p_expert": "P(expert) over all tokens",
}


__all__ = ["CAPTIONS", "COLUMN_HELP", "HOW_TO_READ", "NO_DRIVERS", "SCALE_NOTE", "compare_intro", "report_intro"]
