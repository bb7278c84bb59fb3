"""The CPC network (paper §3.3–3.5): ViT backbone, cluster token, HV-BiLSTM, patch classifier, losses."""
from cpcx.model.network import CPCNet, build_model, checkpoint_meta, cluster_vectors, load_checkpoint

__all__ = ["CPCNet", "build_model", "checkpoint_meta", "cluster_vectors", "load_checkpoint"]
