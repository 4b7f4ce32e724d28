"""Mixtures of LoRA experts: the shared machinery, then one file per paper.

* :mod:`.routers` — top-k softmax (with jitter), dense softmax and task-conditioned gates;
* :mod:`.experts` — E LoRA experts stacked in two tensors (A: E×r×d_in, B: E×d_out×r), with a dense
  path over all experts and a sparse top-k dispatch that groups tokens by expert; and stacked bottleneck
  adapters (the experts of the adapter mixtures, PESC and AdaMix) that run the same two ways;
* :mod:`.losses` — the auxiliary losses as pure functions of router outputs;
* :mod:`.layers` — a mixture of LoRA experts on one frozen linear, the layer most papers share (its routing
  and mixing as separate steps a method may override), and layers routed by the task id alone;
* :mod:`.separate` — N LoRAs trained separately first (one per task, or per cluster of one task's data),
  then frozen and composed: what MoA and MoLE share;
* the methods: :mod:`.mixlora`, :mod:`.loramoe`, :mod:`.mola`, :mod:`.moral`, :mod:`.moelora_cl`,
  :mod:`.moelora_mt`, :mod:`.moa`, :mod:`.pesc`, :mod:`.adamix`, :mod:`.polytropon`, :mod:`.sira`, :mod:`.mole`.

Every mixture plugs into the core like any adapter: its config chooses the sites, its layers report
each routing decision to the model's context (:meth:`~lorafam_nb.core.AdapterContext.route`), and its
config turns the routing of a whole forward pass into named auxiliary losses.
"""
from .experts import BottleneckAdapters, Dispatch, LoRAExperts
from .layers import MoELinearConfig, MoELoRALinear
from .losses import cv_squared, localized_balance, router_z_loss, switch_load_balance
from .routers import DenseRouter, Routing, TaskRouter, TopKRouter, top_k

__all__ = ["BottleneckAdapters", "DenseRouter", "Dispatch", "LoRAExperts", "MoELinearConfig", "MoELoRALinear", "Routing",
           "TaskRouter", "TopKRouter", "cv_squared", "localized_balance", "router_z_loss", "switch_load_balance", "top_k"]
