"""Mutation check: deliberate breaks, each applied to a temporary copy of the project, and the
tests named for it run there; a break that no test catches is reported as surviving.

Each break is one exact text replacement in one file. A break whose text is no longer in its
file is reported as stale (the list must follow the code). Runs the named tests only, one break
at a time, each in a fresh copy; about 4-8 minutes on 2 cores.

Usage: python tools/mutation_check.py [--only NAME ...] [--list]
Exit status: 0 when every break was caught, 1 otherwise.
"""
import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple, Tuple

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
COPIED = ('mmcbn', 'tools', 'tests', 'configs', 'setup.cfg')


class Break(NamedTuple):
    name: str
    path: str
    old: str
    new: str
    tests: Tuple[str, ...]
    every: bool = False  # caught only if every named test fails (else: if any fails)


BREAKS = [
    Break('dist_train launches one process', 'tools/dist_train.sh',
          '--nproc_per_node=$GPUS', '--nproc_per_node=1',
          ('tests/test_tools.py::test_dist_train_with_two_cpu_processes', )),
    Break('bf16 batch statistics rounded to bf16', 'mmcbn/layers/conv_moments.py',
          '    return torch.batch_norm_update_stats(y, scratch_mean, scratch_var, 0.0)',
          '    mean, var = torch.batch_norm_update_stats(y, scratch_mean, scratch_var, 0.0)\n'
          '    return mean.bfloat16().float(), var.bfloat16().float()',
          ('tests/test_layer.py::test_autocast_bfloat16_keeps_statistics_in_float32', )),
    Break('a stored window entry in use raises', 'mmcbn/layers/iteration_state.py',
          '    weights = window.in_window(len(compensable))',
          '    raise RuntimeError("a window entry is used")',
          ('tests/test_configs.py::test_demo_config_trains_with_its_window', )),
    Break('running-statistic update switched off', 'mmcbn/layers/running_stats.py',
          '    tensor weight alone would be read back to the host)."""\n',
          '    tensor weight alone would be read back to the host)."""\n    return\n',
          ('tests/test_layer.py::test_eval_is_batchnorm_with_running_stats',
           'tests/test_layer.py::test_non_finite_batch_never_enters_running_stats_during_burn_in',
           'tests/test_running_stat_readers.py::'
           'test_state_dict_from_train_mode_loads_into_a_bn_model_with_equal_outputs',
           'tests/test_running_stat_readers.py::'
           'test_convert_cbn_to_bn_from_train_mode_gives_the_eval_outputs'), True),
    Break('compensated mean without the bias', 'mmcbn/layers/conv_moments.py',
          '        mean_hat = mean_hat + b', '        mean_hat = mean_hat + 0 * b',
          ('tests/test_layer.py::test_matches_float64_reference', )),
    Break('no clamp of a compensated second moment', 'mmcbn/layers/records.py',
          '        kept = var_hat >= 0\n', '        kept = var_hat >= -float("inf")\n',
          ('tests/test_layer.py::test_clamped_entries_match_float64_reference', )),
    Break('window gradient: mean term dropped', 'mmcbn/layers/normalize.py',
          '    neg_grad_mean = torch.addcmul(neg_base, terms.clamped_mean, u)',
          '    neg_grad_mean = terms.clamped_mean * u',
          ('tests/test_layer.py::test_matches_float64_reference', )),
    Break("BN backward without the batch's (1 - 1/k) share", 'mmcbn/layers/normalize.py',
          'grad_x = grad_x.addcmul_(grad_out, neg_rest', '_ = grad_x.addcmul(grad_out, neg_rest',
          ('tests/test_layer.py::test_matches_float64_reference', )),
    Break('merged calls without the spread between them', 'mmcbn/layers/window.py',
          '            merged[c:2 * c] += spread  # the variance about the merged mean',
          '            pass',
          ('tests/test_layer.py::test_shared_layer_in_one_iteration_merges_into_one_entry', )),
    Break('non-finite batch recorded', 'mmcbn/layers/window.py',
          '            self.pending_row = torch.where(finite, row, self.zero)',
          '            self.pending_row = row',
          ('tests/test_layer.py::test_non_finite_batch_never_enters_the_window_or_running_stats',
           )),
    Break('window one entry short', 'mmcbn/layers/cross_iteration_bn.py',
          'window.recent(self._effective_window - 1)', 'window.recent(self._effective_window - 2)',
          ('tests/test_layer.py::test_matches_float64_reference', )),
    Break('entries aged from the wrong slot', 'mmcbn/layers/window.py',
          '            age = (self.cursor - 1 - self.slot_index).remainder(self.capacity) + 1',
          '            age = (self.cursor - self.slot_index).remainder(self.capacity) + 1',
          ('tests/test_layer.py::test_effective_window_below_the_ring_uses_the_newest_entries', )),
    Break('norm-act conversion drops the activation', 'mmcbn/converters.py',
          '        return self.act(self.drop(super().forward(input)))',
          '        return self.drop(super().forward(input))',
          ('tests/test_converters.py', )),
    Break('BN subclasses converted whatever they add', 'mmcbn/converters.py',
          '            problem = _plain_bn_problem(m)', '            problem = None',
          ('tests/test_converters.py', )),
    Break('momentum=None reads the counter back to the host',
          'mmcbn/layers/cross_iteration_bn.py',
          '            self.num_batches_tracked.to(self.running_mean.dtype).reciprocal()',
          '            1.0 / float(self.num_batches_tracked)',
          ('tests/test_step_census.py', )),
    Break('eps accepted when not finite', 'mmcbn/layers/validation.py',
          '    if not math.isfinite(value) or (positive and not value > 0):',
          '    if positive and not value > 0:',
          ('tests/test_layer.py::test_bad_arguments_name_the_argument', )),
    Break('torch 2.1: a checkpointed saved input read anyway', 'mmcbn/layers/torch_features.py',
          '        return True\n', '        return False\n',
          ('tests/test_torch_support.py', )),
    Break('a layer that cannot read its conv input stays silent',
          'mmcbn/layers/cross_iteration_bn.py', "            self._warn_once('underived', (",
          "            (lambda *args: None)('underived', (",
          ('tests/test_torch_support.py', )),
    Break('burn-in skipped', 'mmcbn/engine/hooks/cbn_hook.py',
          '        if self.in_burnin(runner):\n            return 1',
          '        if False:\n            return 1',
          ('tests/test_hook.py', )),
    Break('linear growth one step ahead', 'mmcbn/engine/hooks/cbn_hook.py',
          '        done = runner.iter - self.burnin_end_iter(runner) + 1',
          '        done = runner.iter - self.burnin_end_iter(runner) + 2',
          ('tests/test_hook.py', )),
    Break('running statistics not moved to the new weights', 'mmcbn/layers/running_stats.py',
          '    torch._foreach_add_(means, [h[0] for h in halves])\n',
          '',
          ('tests/test_running_stats.py', )),
    Break('a non-finite batch blends into the running statistics', 'mmcbn/layers/running_stats.py',
          '        blend = self._factor_tensor(factor) * finite',
          '        blend = self._factor_tensor(factor)',
          ('tests/test_layer.py::test_non_finite_batch_never_enters_running_stats_during_burn_in', )),
    Break('the optimizer step moves only the first layer', 'mmcbn/layers/running_stats.py',
          'zip(*moves))', 'zip(*moves[:1]))',
          ('tests/test_step_census.py::test_an_optimizer_step_ends_every_layers_iteration_in_one_set_of_kernels', )),
    Break('the batched commit leaves the cursors where they were', 'mmcbn/layers/window.py',
          'torch._foreach_add([w.cursor for w in on_host], 1)',
          'torch._foreach_add([w.cursor for w in on_host], 0)',
          ('tests/test_layer.py::test_an_optimizer_step_that_moves_the_conv_ends_the_iteration', )),
    Break('a commit in traced code leaves the device count where it was', 'mmcbn/layers/window.py',
          '            w.cursor = w.cursor + 1\n', '            w.cursor = w.cursor + 0\n',
          ('tests/test_compile.py::test_compiled_forward_that_ends_the_iteration_equals_eager', )),
    Break('synchronised backward sends a third vector', 'mmcbn/layers/normalize.py',
          'all_reduce_sum(torch.stack([sum_dy, sum_dy_xhat])',
          'all_reduce_sum(torch.stack([sum_dy, sum_dy_xhat, sum_dy])',
          ('tests/test_distributed.py::test_synchronised_cbn_on_2x1_images_equals_one_process_on_2', )),
    Break('compare_norms evaluates its EMA with the compensated buffers', 'tools/compare_norms.py',
          "    with plain_stats.loaded():\n        results['EMA'] = runner.val_loop.run()",
          "    results['EMA'] = runner.val_loop.run()",
          ('tests/test_evidence_tools.py::'
           'test_compare_norms_evaluates_the_ema_the_compensated_ema_and_precise_statistics', )),
    Break('benchmark reports the window alone as the CBN state', 'tools/benchmark.py',
          'm.window_nbytes() + m.running_stats_nbytes()', 'm.window_nbytes()',
          ('tests/test_evidence_tools.py::test_benchmark_tool_prints_ratios_and_window_state', )),
    Break('entries without derivatives compensated with zeros', 'mmcbn/layers/iteration_state.py',
          'use_hat = window.compensable_mask[:, None] > 0',
          'use_hat = window.compensable_mask[:, None] >= 0',
          ('tests/test_layer.py::test_window_of_compensable_and_uncompensable_entries', )),
    Break('patch mean reads undilated kernel offsets', 'mmcbn/layers/conv_moments.py',
          '            torch.arange(kernel, device=device) * dilation - pad)',
          '            torch.arange(kernel, device=device) - pad)',
          ('tests/test_conv_moments.py::test_derivatives_match_autograd', )),
    Break('an optimizer step ends the iteration of layers it did not move',
          'mmcbn/layers/cross_iteration_bn.py',
          '        if versions == self._producer_versions:', '        if versions is None:',
          ('tests/test_layer.py::test_an_optimizer_step_that_moves_the_conv_ends_the_iteration', )),
    Break('the step forgets the record of the entry it overwrites',
          'mmcbn/layers/cross_iteration_bn.py',
          '                layer._state.recorded = layer._window.stats_snapshot',
          '                pass',
          ('tests/test_layer.py::test_an_optimizer_step_that_moves_the_conv_ends_the_iteration', )),
    Break('the optimizer step leaves the entry beside the ring', 'mmcbn/layers/cross_iteration_bn.py',
          '        commit_pending_entries([layer._window for layer in ending], snapshot)\n',
          '',
          ('tests/test_layer.py::'
           'test_frozen_conv_skips_derivatives_and_window_memory_budget', )),
    Break('gathered sample keeps the positions past the edge', 'mmcbn/layers/conv_moments.py',
          '        return _gathered(t, images, rows, cols) * inside.to(t.dtype)',
          '        return _gathered(t, images, rows, cols)',
          ('tests/test_conv_moments.py::'
           'test_gathered_sample_averages_to_the_exact_derivative_over_its_cycle', )),
    Break('a compiled sampled derivative draws Python offsets', 'mmcbn/layers/cross_iteration_bn.py',
          '        if self.derivative_positions is not None and is_compiling():', '        if False:',
          ('tests/test_compile.py::test_compiled_block_with_a_sampled_derivative_is_one_graph', )),
    Break('a compiled step recompiles every iteration', 'mmcbn/layers/cross_iteration_bn.py',
          '        if not self._counts_iterations and self._effective_window > 1:',
          '        if self._iteration is None and self._effective_window > 1:',
          ('tests/test_compile.py::'
           'test_compiled_block_is_one_graph_compiled_once_and_equals_eager', )),
]


def _copy_project(dest: str) -> None:
    for name in COPIED:
        src = osp.join(ROOT, name)
        if osp.isdir(src):
            shutil.copytree(src, osp.join(dest, name),
                            ignore=shutil.ignore_patterns('__pycache__', '*.egg-info'))
        else:
            shutil.copy2(src, dest)


def run_break(brk: Break) -> Tuple[str, float]:
    """Applies ``brk`` in a fresh copy and runs its tests: 'caught', 'SURVIVED' or 'STALE'."""
    with open(osp.join(ROOT, brk.path)) as f:
        text = f.read()
    if text.count(brk.old) != 1:
        return 'STALE', 0.0
    with tempfile.TemporaryDirectory(prefix='mutation_') as tmp:
        _copy_project(tmp)
        with open(osp.join(tmp, brk.path), 'w') as f:
            f.write(text.replace(brk.old, brk.new))
        env = dict(os.environ, PYTHONPATH=tmp, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD='1')
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                               *(() if brk.every else ('-x', )), *brk.tests], cwd=tmp, env=env,
                              capture_output=True, text=True, timeout=600)
        elapsed = time.perf_counter() - start
    # pytest: 0 all passed (the break survived), 1 a test failed (caught); anything else is an
    # error of the run itself (a collection error also means the break was noticed)
    if proc.returncode == 0:
        return 'SURVIVED', elapsed
    passed = re.search(r'(\d+) passed', proc.stdout)
    if brk.every and passed:
        return f'{passed.group(1)} of its tests SURVIVED', elapsed
    return 'caught', elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--only', nargs='*', help='run only the breaks whose name contains one '
                        'of these words')
    parser.add_argument('--list', action='store_true', help='list the breaks and exit')
    args = parser.parse_args()
    breaks = [b for b in BREAKS if not args.only or any(w in b.name for w in args.only)]
    if args.list:
        for b in breaks:
            print(f'{b.name}: {b.path} -> {", ".join(b.tests)}')
        return 0
    print('| break | file | tests | result | s |')
    print('|---|---|---|---|---:|')
    bad = 0
    for b in breaks:
        result, elapsed = run_break(b)
        bad += result != 'caught'
        tests = ', '.join(t.split('::')[-1] for t in b.tests)
        print(f'| {b.name} | {b.path} | {tests} | {result} | {elapsed:.0f} |', flush=True)
    print(f'{len(breaks) - bad} of {len(breaks)} breaks caught')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
