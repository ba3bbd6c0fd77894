"""Scaling laws fitted to training runs: Kaplan et al. 2020 (power laws in N, D and C) and Hoffmann et al.
2022 (Chinchilla: approach 2, IsoFLOP parabolas; approach 3, the parametric loss E + A/N^alpha + B/D^beta).

`bench.py scaling` trains the runs; this module only fits numbers, with numpy and torch's L-BFGS (no scipy).
Every fit takes one-dimensional arrays over runs: N parameters, D training tokens, C training FLOPs, L loss
(nats per token; exponents do not depend on the unit, E, A, B and Kaplan's N_c, D_c do), and `budget` (the
nominal compute budget each run belongs to: its IsoFLOP profile).
"""
import math

import numpy as np
import torch

# The papers' fits, for the table beside ours. Kaplan et al. 2020: eq. 1.1-1.3 and 1.5 (non-embedding N,
# nats per BPE token of WebText2), the compute-efficient frontier N ∝ C^0.73 (eq. 1.7, section 6.1).
# Hoffmann et al. 2022: approach 2's a (Table 2: 0.49, CI 0.462-0.534; "about 0.50"), approach 3's constants
# (eq. 10 and section D.2: nats per SentencePiece token of MassiveText).
KAPLAN = {"alpha_N": 0.076, "alpha_D": 0.095, "alpha_C": 0.050, "N_opt_exponent": 0.73, "N_c": 8.8e13, "D_c": 5.4e13}
CHINCHILLA = {"a": 0.50, "b": 0.50, "E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def non_embedding_params(model):
    """Kaplan et al.'s N: the parameters without the token and position embedding matrices (every
    nn.Embedding's weight; a tied output layer shares the token embedding's matrix, so it is left out too)."""
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return model.num_params(False) - sum(embeddings.values())


def r_squared(y, y_hat):
    """Coefficient of determination 1 - SS_res / SS_tot of predictions y_hat of y."""
    y, y_hat = np.asarray(y, float), np.asarray(y_hat, float)
    total = np.sum((y - y.mean()) ** 2)
    return float(1 - np.sum((y - y_hat) ** 2) / total) if total > 0 else float("nan")


def interval(samples, level=0.95):
    """The central `level` percentile interval [lo, hi] of bootstrap samples (NaNs dropped)."""
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return [float("nan"), float("nan")]
    return [float(np.quantile(samples, (1 - level) / 2)), float(np.quantile(samples, (1 + level) / 2))]


# ----------------------------------------------------------------------------- power laws (Kaplan)

def power_law(x, y):
    """Least squares of log y = log k - alpha log x: y = k x^-alpha. Returns {"k", "alpha", "r2"} with R² of
    y itself (not of its log)."""
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    k, alpha = math.exp(intercept), -slope
    return {"k": k, "alpha": float(alpha), "r2": r_squared(y, k * np.asarray(x, float) ** -alpha)}


# ----------------------------------------------------------------------------- approach 2: IsoFLOP profiles

def isoflop_minimum(N, L):
    """Chinchilla's approach 2 for one budget: the parabola L = p0 (log N)^2 + p1 log N + p2 fitted by least
    squares, its minimum (N_opt, L_opt), whether that minimum is interior (the parabola's minimum strictly
    inside the sizes trained and the lowest loss measured not at the smallest or largest size: else the
    minimum is not bracketed by the data, or there is none when p0 <= 0), and R²."""
    x = np.log(np.asarray(N, float))
    p = np.polyfit(x, L, 2)
    x_min = -p[1] / (2 * p[0]) if p[0] > 0 else (x.min() if L[np.argmin(x)] < L[np.argmax(x)] else x.max())
    lowest = x[np.argmin(L)]  # the best run measured: at the smallest or largest size, the minimum is not bracketed
    interior = bool(p[0] > 0 and x.min() < x_min < x.max() and x.min() < lowest < x.max())
    return {"N_opt": float(math.exp(x_min)), "L_opt": float(np.polyval(p, x_min)), "interior": interior,
            "coef": p.tolist(), "r2": r_squared(L, np.polyval(p, x))}


def nearest_sizes(N, L, group, window):
    """The `window` runs of a budget's profile (indices `group`) nearest in size to its lowest loss: that
    run and its neighbours in N, shifted inward at the ends of the profile (so a lowest loss at the smallest
    or largest size stays at the edge of the window)."""
    order = group[np.argsort(N[group])]
    k = min(window, len(order))
    first = min(max(int(np.argmin(L[order])) - k // 2, 0), len(order) - k)
    return order[first:first + k]


def approach2(N, D, C, L, budget, n_boot=1000, seed=0, window=5):
    """Hoffmann et al. 2022, approach 2 (section 3.2): for each budget an IsoFLOP parabola in log N (through
    the `window` sizes nearest the lowest loss: a parabola is a local shape, and far runs bend it), its
    minimum N_opt (D_opt: the tokens at N_opt on that profile, from a line of log D on log N; L_opt:
    the parabola's minimum), then N_opt = G C^a, D_opt ∝ C^b and Kaplan's frontier L_opt = (C_c / C)^alpha_C
    by least squares in log-log. C of a budget: the mean of its runs' C (whole steps make them differ by a
    fraction of a percent). When some minima are not interior (2 or more are), a second exponent a_interior
    through the interior ones only (Hoffmann et al. fit interior minima). Intervals: 95% residual bootstrap
    (each budget's parabola residuals resampled, inflated by sqrt(n / (n - 3)), n_boot times). Needs 3 or
    more sizes per budget and 2 or more budgets."""
    N, D, C, L, budget = (np.asarray(v, float) for v in (N, D, C, L, budget))
    budgets = sorted(set(budget))
    if len(budgets) < 2 or any((budget == b).sum() < 3 for b in budgets):
        raise ValueError("approach 2 needs 2 or more budgets with 3 or more sizes each")
    groups = [nearest_sizes(N, L, np.flatnonzero(budget == b), window) for b in budgets]
    c = np.array([C[np.flatnonzero(budget == b)].mean() for b in budgets])

    def fit(losses, interior=None):
        mins = [isoflop_minimum(N[g], losses[g]) for g in groups]
        n_opt = np.array([m["N_opt"] for m in mins])
        d_opt = np.array([math.exp(np.polyval(np.polyfit(np.log(N[g]), np.log(D[g]), 1), math.log(m["N_opt"])))
                          for m, g in zip(mins, groups)])
        l_opt = np.array([m["L_opt"] for m in mins])
        inside = power_law(c[interior], n_opt[interior]) if interior is not None else None
        return mins, n_opt, d_opt, l_opt, power_law(c, n_opt), power_law(c, d_opt), power_law(c, l_opt), inside

    mins, n_opt, d_opt, l_opt, fn, fd, fl, _ = fit(L)
    interior = np.array([m["interior"] for m in mins])
    interior = interior if 2 <= interior.sum() < len(interior) else None  # a second line: interior minima only
    _, _, _, _, _, _, _, fi = fit(L, interior)
    rng = np.random.default_rng(seed)
    fitted = np.concatenate([np.polyval(m["coef"], np.log(N[g])) for m, g in zip(mins, groups)])
    order = np.concatenate(groups)
    resid = L[order] - fitted
    boot = []
    for _ in range(n_boot):
        sample = L.copy()
        start = 0
        for g in groups:
            r = resid[start:start + len(g)] * math.sqrt(len(g) / max(len(g) - 3, 1))
            sample[g] = fitted[start:start + len(g)] + rng.choice(r, len(g))
            start += len(g)
        _, _, _, _, bn, bd, bl, bi = fit(sample, interior)
        boot.append((-bn["alpha"], -bd["alpha"], bl["alpha"], -bi["alpha"] if bi else np.nan))
    boot = np.array(boot).reshape(-1, 4)
    return {"budgets": [{"budget": b, "C": float(cb), "N_opt": float(n), "D_opt": float(d), "L_opt": float(lo),
                         "interior": m["interior"], "r2": m["r2"], "coef": m["coef"], "sizes": [float(N[i]) for i in g]}
                        for b, cb, n, d, lo, m, g in zip(budgets, c, n_opt, d_opt, l_opt, mins, groups)],
            "a": -fn["alpha"], "a_ci": interval(boot[:, 0]), "G": fn["k"], "a_r2": r2_log(c, n_opt, fn),
            "b": -fd["alpha"], "b_ci": interval(boot[:, 1]), "b_k": fd["k"],
            "alpha_C": fl["alpha"], "alpha_C_ci": interval(boot[:, 2]), "C_c": fl["k"] ** (1 / fl["alpha"])
            if fl["alpha"] > 0 else float("nan"), "frontier_k": fl["k"], "frontier_r2": fl["r2"],
            "all_interior": all(m["interior"] for m in mins),
            **({"a_interior": -fi["alpha"], "a_interior_ci": interval(boot[:, 3]), "interior_budgets":
                [b for b, i in zip(budgets, interior) if i]} if fi else {})}


def r2_log(x, y, fit):
    """R² of a power-law fit in log space (N_opt spans decades: R² of log N_opt)."""
    return r_squared(np.log(y), np.log(fit["k"]) - fit["alpha"] * np.log(x))


# ----------------------------------------------------------------------------- Huber fits by L-BFGS (approach 3, Kaplan's L(N, D))

def huber(r, delta):
    """Huber's loss of residuals r and its derivative: r²/2 inside |r| <= delta, linear outside (Huber 1964)."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta)), np.clip(r, -delta, delta)


def huber_objective(log_model, theta, logN, logD, logL, delta):
    """sum Huber(log_model(theta) - log L) and its gradient in theta (analytic: log_model returns the
    prediction and its Jacobian)."""
    pred, jac = log_model(theta, logN, logD)
    h, dh = huber(pred - logL, delta)
    return h.sum(-1), (jac * dh).sum(-1)


def huber_fit(log_model, starts, logN, logD, logL, delta=1e-3, top=4, max_iter=200):
    """Minimise sum Huber(log_model(theta, log N, log D) - log L) over theta by L-BFGS (torch.optim.LBFGS,
    float64, strong Wolfe line search; the objective and its gradient in numpy) as Hoffmann et al. do
    (section D.2), from the `top` best of the grid of starting points `starts` (k, n_params), each scored first
    by the objective. Returns (theta, objective)."""
    starts = np.asarray(starts, float)
    with np.errstate(all="ignore"):
        scores = huber_objective(log_model, starts.T[..., None], logN, logD, logL, delta)[0]
    scores = np.where(np.isfinite(scores), scores, np.inf)
    best_theta, best = None, float("inf")
    for i in np.argsort(scores, kind="stable")[:top]:
        theta = torch.tensor(starts[i], dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-13,
                                history_size=20, line_search_fn="strong_wolfe")

        def closure():
            with np.errstate(all="ignore"):
                value, grad = huber_objective(log_model, theta.detach().numpy(), logN, logD, logL, delta)
            theta.grad = torch.from_numpy(np.nan_to_num(np.asarray(grad, float), nan=0.0))
            return torch.tensor(float(value) if np.isfinite(value) else 1e300, dtype=torch.float64)
        opt.step(closure)
        with np.errstate(all="ignore"):
            value = float(huber_objective(log_model, theta.detach().numpy(), logN, logD, logL, delta)[0])
        if math.isfinite(value) and value < best:
            best_theta, best = theta.detach().numpy().copy(), value
    return best_theta, best


def chinchilla_log_loss(theta, logN, logD):
    """log L of L = E + A / N^alpha + B / D^beta, theta = (log A, log B, log E, alpha, beta) (eq. 10 of
    Hoffmann et al.; the log-sum-exp form of section D.2), and its Jacobian (5, ...) in theta."""
    a, b, e, alpha, beta = theta
    terms = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD, e + 0 * logN))
    top = terms.max(0)
    w = np.exp(terms - top)
    s = w.sum(0)
    w = w / s
    return top + np.log(s), np.stack([w[0], w[1], w[2], -w[0] * logN, -w[1] * logD])


def chinchilla_starts(logN, logD, logL, exponents=np.arange(0.025, 2.001, 0.025)):
    """Starting points for approach 3: a grid of (alpha, beta) (0.025..2 by 0.025), and at each point the
    E, A, B >= 0 of the weighted least squares of L on [1, N^-alpha, D^-beta] (weights 1/L: relative errors,
    as the log loss sees them; a negative one is set to 1e-6). Returns them as thetas (log A, log B, log E,
    alpha, beta), one per grid point (huber_fit scores them). Hoffmann et al. start L-BFGS from a grid of
    all five parameters; solving the three linear ones at each grid point does the same search in less time."""
    al, be = (g.ravel() for g in np.meshgrid(exponents, exponents, indexing="ij"))
    L = np.exp(logL)
    X = np.stack(np.broadcast_arrays(np.ones((len(al), len(L))), np.exp(-al[:, None] * logN),
                                     np.exp(-be[:, None] * logD)), -1) / L[:, None]
    coef = np.linalg.solve(X.transpose(0, 2, 1) @ X + 1e-12 * np.eye(3), (X.transpose(0, 2, 1) @ np.ones(len(L)))[..., None])
    coef = np.maximum(coef[..., 0], 1e-6)
    return np.column_stack([np.log(coef[:, 1]), np.log(coef[:, 2]), np.log(coef[:, 0]), al, be])


def fit_law(law, logN, logD, logL, delta=1e-3, top=4, start=None, grid=True):
    """The theta of `law` (CHINCHILLA_LAW or KAPLAN_LAW: its log-loss model, its grid of starts, its shift)
    that minimises the Huber loss of log L (huber_fit), from its grid of starts (unless not grid) and from
    `start` if given (a bootstrap resample starts from the full fit only, 50 iterations at most). The fit
    runs on log N and log D less their means (the shift moves theta there and back: log A - alpha log N
    then depends on alpha through centred values only, which L-BFGS finds far better conditioned)."""
    model, grid_starts, shift = law
    mN, mD = float(np.mean(logN)), float(np.mean(logD))
    x, y = logN - mN, logD - mD
    starts = [grid_starts(x, y, logL)] if grid else []
    if start is not None:
        starts.insert(0, shift(np.asarray(start, float), -mN, -mD)[None])
    theta, _ = huber_fit(model, np.vstack(starts), x, y, logL, delta, top, max_iter=150 if grid else 50)
    return shift(theta, mN, mD)


def shift_chinchilla(theta, sN, sD):
    """theta of log N - sN, log D - sD -> theta of log N, log D: log A + alpha sN, log B + beta sD."""
    a, b, e, alpha, beta = theta
    return np.array([a + alpha * sN, b + beta * sD, e, alpha, beta])


def shift_kaplan(theta, sN, sD):
    """theta of log N - sN, log D - sD -> theta of log N, log D: log N_c + sN, log D_c + sD."""
    log_nc, log_dc, alpha_n, alpha_d = theta
    return np.array([log_nc + sN, log_dc + sD, alpha_n, alpha_d])


def approach3(N, D, L, delta=1e-3, n_boot=200, seed=0):
    """Hoffmann et al. 2022, approach 3 (section 3.3, D.2): L(N, D) = E + A / N^alpha + B / D^beta fitted by
    minimising the Huber loss (delta 1e-3) of log L by L-BFGS from a grid of starting points (fit_law,
    chinchilla_starts). N_opt(C) = G (C/6)^a with a = beta / (alpha + beta) (eq. 4, for C = 6 N D).
    Returns E, A, B, alpha, beta, a with their "_ci" and "_se", r2 and theta (bootstrapped_fit)."""
    return bootstrapped_fit(CHINCHILLA_LAW, chinchilla_constants, predict_chinchilla, N, D, L, delta, n_boot, seed)


def bootstrapped_fit(law, constants, predict, N, D, L, delta, n_boot, seed):
    """fit_law on all runs, then on n_boot resamples of the runs (with replacement; each started from the full
    fit): the constants(theta) with their 95% bootstrap intervals ("_ci") and standard errors ("_se"), R² of
    L (predict(constants, N, D) against L) and theta."""
    N, D, L = (np.asarray(v, float) for v in (N, D, L))
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    theta = fit_law(law, logN, logD, logL, delta)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_boot):
        i = rng.integers(0, len(L), len(L))
        boot.append(constants(fit_law(law, logN[i], logD[i], logL[i], delta, start=theta, grid=False)))
    out = constants(theta)
    out["r2"] = r_squared(L, predict(out, N, D))
    out["theta"] = theta.tolist()
    for key in list(constants(theta)):
        out[key + "_ci"] = interval([b[key] for b in boot])
        out[key + "_se"] = float(np.std([b[key] for b in boot], ddof=1)) if len(boot) > 1 else float("nan")
    return out


def chinchilla_constants(theta):
    a, b, e, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta,
            "a": beta / (alpha + beta) if alpha + beta > 0 else float("nan")}


def predict_chinchilla(fit, N, D):
    """L = E + A / N^alpha + B / D^beta of an approach-3 fit."""
    N, D = np.asarray(N, float), np.asarray(D, float)
    return fit["E"] + fit["A"] / N ** fit["alpha"] + fit["B"] / D ** fit["beta"]


def kaplan_log_loss(theta, logN, logD):
    """log L of Kaplan et al.'s eq. 1.5, L(N, D) = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D,
    theta = (log N_c, log D_c, alpha_N, alpha_D), and its Jacobian (4, ...) in theta."""
    log_nc, log_dc, alpha_n, alpha_d = theta
    u = alpha_n / alpha_d * (log_nc - logN)
    v = log_dc - logD + 0 * u
    top = np.maximum(u, v)
    eu, ev = np.exp(u - top), np.exp(v - top)
    lse = top + np.log(eu + ev)
    wu, wv = eu / (eu + ev), ev / (eu + ev)
    return alpha_d * lse, np.stack([wu * alpha_n, alpha_d * wv, wu * (log_nc - logN), lse - wu * u])


def kaplan_starts(logN, logD, logL, exponents=np.arange(0.01, 0.601, 0.01)):
    """Starting points for Kaplan's L(N, D): a grid of (alpha_N, alpha_D) (0.01..0.6 by 0.01), and at each
    point N_c, D_c from the weighted least squares of L^(1/alpha_D) = N_c^p N^-p + D_c / D (p = alpha_N /
    alpha_D; linear in N_c^p and D_c; weights 1/L^(1/alpha_D), relative errors). Thetas (log N_c, log D_c,
    alpha_N, alpha_D), one per grid point."""
    an, ad = (g.ravel() for g in np.meshgrid(exponents, exponents, indexing="ij"))
    p = an / ad
    with np.errstate(all="ignore"):
        y = np.exp(logL[None, :] / ad[:, None])
        X = np.stack([np.exp(-p[:, None] * logN), np.exp(-logD) + 0 * y], -1) / y[..., None]
        coef = np.linalg.solve(X.transpose(0, 2, 1) @ X + 1e-12 * np.eye(2), (X.transpose(0, 2, 1) @ np.ones(len(logL)))[..., None])
    coef = np.maximum(np.nan_to_num(coef[..., 0], nan=1e-6), 1e-6)
    return np.column_stack([np.log(coef[:, 0]) / p, np.log(coef[:, 1]), an, ad])


def kaplan(N, D, L, delta=1e-3, n_boot=200, seed=0):
    """Kaplan et al. 2020's L(N, D) (eq. 1.5, section 4) fitted like approach 3 (Huber on log L, L-BFGS from a
    grid of starts: fit_law, kaplan_starts). Its limits are Kaplan's L(N) = (N_c / N)^alpha_N (data
    unlimited, eq. 1.1) and L(D) = (D_c / D)^alpha_D (model unlimited, eq. 1.2). Returns N_c, D_c,
    alpha_N, alpha_D with their "_ci" and "_se", r2 and theta (bootstrapped_fit)."""
    return bootstrapped_fit(KAPLAN_LAW, kaplan_constants, predict_kaplan, N, D, L, delta, n_boot, seed)


def kaplan_constants(theta):
    log_nc, log_dc, alpha_n, alpha_d = (float(v) for v in theta)
    return {"N_c": math.exp(log_nc), "D_c": math.exp(log_dc), "alpha_N": alpha_n, "alpha_D": alpha_d}


def predict_kaplan(fit, N, D):
    """Kaplan's eq. 1.5 L(N, D) of a fit."""
    N, D = np.asarray(N, float), np.asarray(D, float)
    return ((fit["N_c"] / N) ** (fit["alpha_N"] / fit["alpha_D"]) + fit["D_c"] / D) ** fit["alpha_D"]


CHINCHILLA_LAW = (chinchilla_log_loss, chinchilla_starts, shift_chinchilla)
KAPLAN_LAW = (kaplan_log_loss, kaplan_starts, shift_kaplan)


# ----------------------------------------------------------------------------- everything, and held-out budgets

def fit_all(N, D, C, L, budget, N_non_embedding=None, n_boot=1000, seed=0):
    """Approach 2 (with the frontier L_opt(C)) and approach 3 on N (total parameters, as Hoffmann et al.),
    Kaplan's L(N, D) on N_non_embedding (Kaplan et al.'s N; default N), and the leave-one-budget-out
    errors: each budget's runs predicted by the fits of the other budgets (approach 3 and Kaplan: mean
    |relative error| of the held-out losses; approach 2: the relative error of the held-out budget's N_opt
    and L_opt read off the lines through the other budgets' minima). Approach 3's and Kaplan's bootstraps
    take n_boot // 5 resamples (each is an L-BFGS fit)."""
    N, D, C, L, budget = (np.asarray(v, float) for v in (N, D, C, L, budget))
    NK = N if N_non_embedding is None else np.asarray(N_non_embedding, float)
    n3 = max(n_boot // 5, 2)
    fits = {"approach2": approach2(N, D, C, L, budget, n_boot, seed),
            "approach3": approach3(N, D, L, n_boot=n3, seed=seed),
            "kaplan": kaplan(NK, D, L, n_boot=n3, seed=seed)}
    held = []
    minima = {m["budget"]: m for m in fits["approach2"]["budgets"]}
    for b in sorted(set(budget)):
        keep, out = budget != b, budget == b
        row = {"budget": b}
        t3 = fit_law(CHINCHILLA_LAW, *(np.log(v[keep]) for v in (N, D, L)), start=fits["approach3"]["theta"])
        row["approach3"] = float(np.mean(np.abs(predict_chinchilla(chinchilla_constants(t3), N[out], D[out]) / L[out] - 1)))
        k = kaplan_constants(fit_law(KAPLAN_LAW, *(np.log(v[keep]) for v in (NK, D, L)), start=fits["kaplan"]["theta"]))
        row["kaplan"] = float(np.mean(np.abs(predict_kaplan(k, NK[out], D[out]) / L[out] - 1)))
        if len(set(budget[keep])) >= 2:
            others = [minima[x] for x in sorted(set(budget[keep]))]
            c = np.array([m["C"] for m in others])
            fn = power_law(c, [m["N_opt"] for m in others])
            fl = power_law(c, [m["L_opt"] for m in others])
            row["N_opt"] = float(fn["k"] * minima[b]["C"] ** -fn["alpha"] / minima[b]["N_opt"] - 1)
            row["L_opt"] = float(fl["k"] * minima[b]["C"] ** -fl["alpha"] / minima[b]["L_opt"] - 1)
        held.append(row)
    fits["leave_one_budget_out"] = held
    return fits


def optimal_n(fit2, C):
    """Approach 2's N_opt = G C^a at compute C."""
    return fit2["G"] * C ** fit2["a"]


def frontier_loss(fit2, C):
    """Kaplan's frontier L_opt(C) = k C^-alpha_C, through approach 2's IsoFLOP minima."""
    return fit2["frontier_k"] * C ** -fit2["alpha_C"]
