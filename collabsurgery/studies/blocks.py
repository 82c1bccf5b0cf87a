"""Recipe fragments that catalog rows are made of: ``dotted.key=value`` overrides per method.

Each fragment states every key of the graph (and objective) it sets, so a row means the same
thing whatever the budget's base recipe says.
"""
from __future__ import annotations

#: paper 000's setups: a single model, label smoothing, and the CL-ILR consensus objective
SINGLE = ("graph.pattern=tree", "graph.heads=1", "graph.split=[]", "graph.branches=null",
          "objective={name: single}")
LABEL_SMOOTHING = (*SINGLE[:-1], "objective={name: label_smoothing, smoothing: 0.05}")
CONSENSUS = ("objective.name=consensus",)


def instances(heads: int) -> tuple[str, ...]:
    """Paper 000's ``heads`` independent instances trained with the consensus objective."""
    return ("graph.pattern=instances", f"graph.heads={heads}", "graph.split=null",
            "graph.branches=null", *CONSENSUS)


def shared(heads: int, split: str, branches: str = "null", rescale: str = "backprop"
           ) -> tuple[str, ...]:
    """Paper 000's ``heads`` heads sharing the trunk up to ``split`` (consensus objective)."""
    return ("graph.pattern=tree", f"graph.heads={heads}", f"graph.split=[{split}]",
            f"graph.branches={branches}", f"graph.rescale={rescale}", *CONSENSUS)


SIMPLE2 = shared(2, "layer1")
HIER4 = shared(4, "layer1,layer2", "[2,2]")

#: paper 003's two students, each its own network (ResNet-20 stands in for its ResNet-32)
PEERS = ("graph={pattern: peers}", "model.name=[cifar_resnet20, cifar_wrn16_2]")
SHARED_VIEWS = ("data.views=shared",)

#: paper 002's Collaborative Group Learning. Every CGL study row states the whole graph section,
#: the objective, data.subsets and the optimizer (one optimizer for all rows: see its notes)
ADAM = ("train.optimizer=adam", "train.lr=0.003", "train.weight_decay=0.0",
        "train.batch_size=32")
SUBSETS, NO_SUBSETS = ("data.subsets=true",), ("data.subsets=false",)
#: every block boundary of ResNet-20 (`collabsurgery splits cifar_resnet20`): 10 layers of
#: modules, as paper 002 cuts its ResNet-18 at every block boundary into 9
RESNET20_BLOCKS = ("layer1.0,layer1.1,layer1,layer2.0,layer2.1,layer2,layer3.0,layer3.1,"
                   "layer3")


def routed(students: int, split: str = RESNET20_BLOCKS, modules: int = 2) -> tuple[str, ...]:
    """Paper 002's random routing: ``students`` paths through ``modules`` modules a layer."""
    return (f"graph={{pattern: routed, split: [{split}], modules: {modules}, "
            f"students: {students}}}",)


def cgl(probability: float) -> tuple[str, ...]:
    """Paper 002's sub-group imitation (T=3, KL ramped up over the first 20% of training)."""
    return (f"objective={{name: cgl, probability: {probability}, temperature: 3.0, "
            "rampup: [0.0, 0.2]}",)


def kdcl(target: str, icl: bool = False) -> tuple[str, ...]:
    """Paper 003's KDCL with ensemble target ``target``; ``icl``: each student its own view."""
    return (*PEERS, f"objective={{name: kdcl, target: {target}}}",
            f"data.views={'per_head' if icl else 'shared'}")
