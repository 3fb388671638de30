"""Every private Keras attribute the package touches (placeholder)."""


def flatten_layers(layer, include_self=False):
    return list(layer._flatten_layers(include_self=include_self))


def default_optimizer(multi_optimizer):
    return multi_optimizer._optimizer_map.default_optimizer


def learning_rate_variable(optimizer):
    import keras

    rate = optimizer._learning_rate
    return rate if isinstance(rate, keras.Variable) else None


def symbolic_build(model, data_batch):
    model._symbolic_build(data_batch=data_batch)


def aggregate_additional_loss(model, loss):
    return model._aggregate_additional_loss(loss)


def loss_tracker(model):
    return model._loss_tracker
