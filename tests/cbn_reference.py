"""An independent float64 reference of CBN for the tests: autograd derivatives, explicit deltas.

It stores, per past iteration, the statistics, the derivatives from ``torch.autograd.grad`` and the
weights they were taken at, and compensates with ``W_t - W_old`` as the paper writes it: nothing here
uses the package's identities or closed-form backward.
"""
import torch


class ReferenceCBN:

    def __init__(self, conv, gamma, beta, window_size, eps=1e-5, compensation=True, momentum=0.1,
                 running_stats_source='batch', window_grad=False):
        self.conv, self.gamma, self.beta = conv, gamma, beta
        self.window_size, self.eps, self.compensation, self.momentum = (window_size, eps,
                                                                        compensation, momentum)
        self.running_stats_source = running_stats_source
        self.window_grad = window_grad  # autograd through the compensated entries' current weights
        self.history = []  # newest last
        self.num_clamped = 0  # compensated entries whose second moment fell below mean^2
        self.running_mean = torch.zeros(conv.out_channels, dtype=torch.float64)
        self.running_var = torch.ones(conv.out_channels, dtype=torch.float64)

    def forward(self, x):
        conv = self.conv
        y = conv(x)
        mu = y.mean((0, 2, 3))
        nu = (y * y).mean((0, 2, 3))
        # derivatives of this iteration's moments, by autograd (row c of d(sum_c m_c)/dW = dm_c/dW_c)
        params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
        dmu = torch.autograd.grad(mu.sum(), params, retain_graph=True)
        dnu = torch.autograd.grad(nu.sum(), params, retain_graph=True)
        mus, nus = [mu], [nu]
        for entry in self.history[::-1][:self.window_size - 1]:
            mu_hat, nu_hat = entry['mu'], entry['nu']
            if self.compensation:
                for p, p_old, g_mu, g_nu in zip(params, entry['params'], entry['dmu'],
                                                entry['dnu']):
                    current = p if self.window_grad else p.detach()
                    delta = (current - p_old).reshape(p.shape[0], -1)
                    mu_hat = mu_hat + (g_mu.reshape(p.shape[0], -1) * delta).sum(1)
                    nu_hat = nu_hat + (g_nu.reshape(p.shape[0], -1) * delta).sum(1)
            mus.append(mu_hat)
            self.num_clamped += int((nu_hat < mu_hat * mu_hat).sum())
            nus.append(torch.maximum(nu_hat, mu_hat * mu_hat))
        k = len(mus)
        mu_bar = torch.stack(mus).mean(0)
        nu_bar = torch.stack(nus).mean(0)
        var_bar = nu_bar - mu_bar * mu_bar
        out = (y - mu_bar[None, :, None, None]) / torch.sqrt(var_bar + self.eps)[None, :, None, None]
        out = out * self.gamma[None, :, None, None] + self.beta[None, :, None, None]
        self.history.append(dict(mu=mu.detach(), nu=nu.detach(),
                                 params=[p.detach().clone() for p in params],
                                 dmu=[g.detach() for g in dmu], dnu=[g.detach() for g in dnu]))
        m = y.numel() // y.shape[1]
        if self.running_stats_source == 'window':
            n, src_mean, src_var = k * m, mu_bar.detach(), var_bar.detach()
        else:
            n, src_mean, src_var = m, mu.detach(), (nu - mu * mu).detach()
        with torch.no_grad():
            self.running_mean.lerp_(src_mean, self.momentum)
            self.running_var.lerp_(src_var * n / (n - 1), self.momentum)
        return y, out, mu_bar.detach(), var_bar.detach()
