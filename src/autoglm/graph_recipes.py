"""Named graph pre-training configs, as plain data (no torch import: the CLI reads them for its
option defaults at start-up).

`CORA_RECIPE` is the best-validation config on Cora (README, benchmarks/graph_ssl.py): the
`GraphSSLConfig` fields behind the defaults of `autoglm graph pretrain / probe` and of the
benchmark; GraphSSLConfig's own defaults stay general. `CORA_TRAINING`: the matching
`pretrain_graph` arguments.
"""

CORA_RECIPE = dict(hidden_dim=512, num_layers=2, propagate_input=False, residual=False, input_projection=False,
                   final_act=False, init="glorot", dropout=0.0, mask_rate=0.5, sce_alpha=3.0,
                   contrastive_weight=0.1, reconstruction_weight=1.0, decorrelation_weight=1.0,
                   decorrelation_lambda=1e-3, augmentations=("edge_drop", "feature_mask"), aug_p=(0.4, 0.4),
                   feature_p=(0.1, 0.1), contrastive_nodes=1024)
CORA_TRAINING = dict(epochs=100, lr=1e-3, weight_decay=0.0)
