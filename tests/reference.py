"""Plain, slow references the fast paths are checked against (never used by fastbp itself).

Column vectors, one example at a time, written straight from the textbook:
z = W a + b, a = phi(z); delta^L = dC/dz^L; delta^l = phi'(z^l) * W^(l+1)^T delta^(l+1);
dW = delta a^T, db = delta; gradients of the mean cost are means over examples.
"""

import numpy as np

SLOPE = 0.01


def phi(name, z):
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, SLOPE * z)
    if name == "identity":
        return z.copy()
    if name == "softmax":
        e = np.exp(z - z.max())
        return e / e.sum()
    raise ValueError(name)


def jacobian(name, z):
    """d phi(z) / dz as a matrix (diagonal for elementwise activations)."""
    a = phi(name, z)
    if name == "softmax":
        return np.diag(a) - np.outer(a, a)
    d = {"sigmoid": a * (1 - a), "tanh": 1 - a ** 2, "relu": (z > 0) * 1.0,
         "leaky_relu": np.where(z > 0, 1.0, SLOPE), "identity": np.ones_like(z)}[name]
    return np.diag(d)


def cost(loss, a, y):
    if loss == "mse":
        return 0.5 * np.sum((y - a) ** 2)
    if loss == "log_loss":
        return -np.sum(y * np.log(a) + (1 - y) * np.log(1 - a))
    return -np.sum(y * np.log(a))  # cross_entropy on softmax (or any positive) outputs


def dcost_da(loss, a, y):
    if loss == "mse":
        return a - y
    if loss == "log_loss":
        return (a - y) / (a * (1 - a))
    return -y / a


def example_gradients(weights, biases, hidden, output, loss, x, y):
    """One example: (cost, dWs, dbs) by the textbook recursion."""
    L = len(weights)
    a, zs, acts = x, [], [x]
    for l, (W, b) in enumerate(zip(weights, biases)):
        z = W @ a + b
        a = phi(output if l == L - 1 else hidden, z)
        zs.append(z)
        acts.append(a)
    delta = jacobian(output, zs[-1]).T @ dcost_da(loss, a, y)
    dWs, dbs = [None] * L, [None] * L
    for l in range(L - 1, -1, -1):
        dWs[l] = np.outer(delta, acts[l])
        dbs[l] = delta.copy()
        if l > 0:
            delta = jacobian(hidden, zs[l - 1]).T @ (weights[l].T @ delta)
    return cost(loss, a, y), dWs, dbs


def mean_gradients(weights, biases, hidden, output, loss, X, Y):
    """Mean cost and mean gradients over the rows of X, Y."""
    total, dWs, dbs = 0.0, [np.zeros_like(W) for W in weights], [np.zeros_like(b) for b in biases]
    for x, y in zip(X, Y):
        c, gw, gb = example_gradients(weights, biases, hidden, output, loss, x, y)
        total += c
        for acc, g in zip(dWs + dbs, gw + gb):
            acc += g
    n = len(X)
    return total / n, [g / n for g in dWs], [g / n for g in dbs]


def sgd_trajectory(weights, biases, hidden, output, loss, X, Y, batches, lr):
    """Plain mini-batch SGD over the given index batches; returns final params and per-batch costs."""
    weights = [W.copy() for W in weights]
    biases = [b.copy() for b in biases]
    costs = []
    for idx in batches:
        c, dWs, dbs = mean_gradients(weights, biases, hidden, output, loss, X[idx], Y[idx])
        costs.append(c)
        for p, g in zip(weights + biases, dWs + dbs):
            p -= lr * g
    return weights, biases, costs


class TorchOptimReference:
    """torch.optim's update formulas, written plainly over lists of float64 arrays (one group,
    dampening 0), with scikit-learn's weights-only ``l2 / rows`` term.

    kind "sgd": g += wd p; momentum: buf = g (first step) else mu buf + g; g = g + mu buf
    (nesterov) or buf; p -= lr g. "adam": g += wd p; m, v moving averages; bias-corrected step.
    "adamw": p *= 1 - lr wd, then adam without wd in g.
    """

    def __init__(self, kind, lr, momentum=0.0, nesterov=False, weight_decay=0.0, betas=(0.9, 0.999),
                 eps=1e-8, l2=0.0):
        self.kind, self.lr, self.momentum, self.nesterov = kind, lr, momentum, nesterov
        self.wd, (self.b1, self.b2), self.eps, self.l2 = weight_decay, betas, eps, l2
        self.t, self.buf, self.m, self.v = 0, None, None, None

    def step(self, params, grads, is_weight, rows):
        self.t += 1
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        for i, (p, g) in enumerate(zip(params, grads)):
            g = g.copy()
            if self.kind != "adamw" and self.wd:
                g = g + self.wd * p
            if self.l2 and is_weight[i]:
                g = g + (self.l2 / rows) * p
            if self.kind == "sgd":
                if self.momentum:
                    if self.t == 1:
                        self.m[i] = g.copy()
                    else:
                        self.m[i] = self.momentum * self.m[i] + g
                    g = g + self.momentum * self.m[i] if self.nesterov else self.m[i]
                p -= self.lr * g
                continue
            if self.kind == "adamw":
                p *= 1 - self.lr * self.wd
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
            p -= (self.lr / bc1) * self.m[i] / (np.sqrt(self.v[i]) / np.sqrt(bc2) + self.eps)


def optimizer_trajectory(weights, biases, hidden, output, loss, X, Y, batches, rule):
    """Mini-batch training over the index batches with a TorchOptimReference rule."""
    weights = [W.copy() for W in weights]
    biases = [b.copy() for b in biases]
    costs = []
    params = weights + biases
    is_weight = [True] * len(weights) + [False] * len(biases)
    for idx in batches:
        c, dWs, dbs = mean_gradients(weights, biases, hidden, output, loss, X[idx], Y[idx])
        costs.append(c)
        rule.step(params, dWs + dbs, is_weight, len(idx))
    return weights, biases, costs
