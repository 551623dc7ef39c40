"""What the learning rules are made of: registries with typed options, a model's anatomy (layers, blocks),
forward-mode layers and attention, tangent sampling and aggregation, the activation-memory meter, errors."""
