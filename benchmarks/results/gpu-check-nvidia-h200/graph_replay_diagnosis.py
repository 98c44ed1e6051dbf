"""The diagnosis of test_kept_tree_counters' failure on the H200 (README.md): the tests'
captured CUDA graph replayed twice in four scenarios, each replay compared with an eager
call. Run from the repository root with the extension built:

    python benchmarks/results/gpu-check-nvidia-h200/graph_replay_diagnosis.py

graph-replay-diagnosis.log is its output with the helper as it was then, which let the
graph's inputs be freed; with `CapturedStep.inputs` keeping them, every line should read
True.
"""

import sys

import torch

sys.path.insert(0, "tests")
from routing_testing import make_inputs, run_routing  # noqa: E402
from test_cuda import capsnet_case, captured_step  # noqa: E402

NAMES = ("v", "grad_u", "grad_W", "grad_bias")


def compare(label, outputs, expected):
    """Per output: bitwise equal, and the largest difference."""
    print(label, [(n, torch.equal(a, expected[n]), float((a - expected[n]).abs().max())) for n, a in zip(NAMES, outputs)])


def main():
    small, large = capsnet_case(32), capsnet_case(200)
    small_inputs = make_inputs(small, dtype=torch.float32, device="cuda")
    large_inputs = make_inputs(large, dtype=torch.float32, device="cuda")
    for scenario in ("A_replay_only", "B_large_same_stream", "C_large_other_stream", "D_large_before_capture"):
        expected = run_routing(*small_inputs, small.iterations, backend="fused")
        if scenario == "D_large_before_capture":
            run_routing(*large_inputs, large.iterations, backend="fused")
            torch.cuda.synchronize()
        captured = captured_step(*small_inputs, small.iterations)
        if scenario == "B_large_same_stream":
            run_routing(*large_inputs, large.iterations, backend="fused")
            torch.cuda.synchronize()
        if scenario == "C_large_other_stream":
            run_routing(*large_inputs, large.iterations, backend="fused")
            other = torch.cuda.Stream()
            other.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(other):
                run_routing(*large_inputs, large.iterations, backend="fused")
        for replay in (1, 2):
            captured.graph.replay()
            torch.cuda.synchronize()
            compare(f"{scenario} r{replay}", captured.outputs, expected)
        again = run_routing(*small_inputs, small.iterations, backend="fused")
        torch.cuda.synchronize()
        print(scenario, "again", all(torch.equal(again[n], expected[n]) for n in expected))


if __name__ == "__main__":
    main()
