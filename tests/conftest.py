import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers_lora.py and friends
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Tests marked `slow`: the cases that took ~2 s or more on 2 shared CPU cores
# (`pytest --durations=40`), so that `pytest -m "not slow"` stays under a minute while
# developing; CI runs them all. One list rather than decorators spread over files that several
# people edit; a name here that no longer matches a collected test is an error (below).
# Entries are node ids or their prefixes ("file.py" marks the whole module).
SLOW = [
    "test_server.py",  # one uvicorn subprocess per fixture; ~30 s to start on 2 cores
    "test_demo.py::test_same_through_the_http_server",
    "test_demo.py::test_one_mixed_batch_is_right_for_every_adapter",
    "test_demo.py::test_shipped_adapters_are_peft_adapters_with_the_same_outputs",
    "test_demo.py::test_bench_runs_on_the_demo_model_with_its_default_sizes",
    "test_demo.py::test_training_script_run_leaves_the_shipped_files_alone",
    "test_lora_triton.py::test_token_counts[133]",
    "test_lora_triton.py::test_split_k_shrink",
    "test_lora_triton.py::test_kernels_compile_for_hopper",
    "test_lora_triton.py::test_ranks[64]",
    "test_lora_triton.py::test_ranks[128]",
    "test_lora_triton.py::test_padded_and_stale_metadata",
    "test_lora_triton.py::test_unaligned_widths",
    "test_lora_triton.py::test_kernels_match_oracle[2-",  # n = 1 (one slice) stays fast
    "test_lora_triton.py::test_kernels_match_oracle[3-",
    "test_lora_triton.py::test_real_decode_heuristic",
    "test_multi_lora.py::test_static_buffer_decode_with_adapters_matches_eager",
    "test_multi_lora.py::test_runtime_load_unload_while_running",
    "test_multi_lora.py::test_many_adapters_through_few_slots_and_small_host_cache",
    "test_multi_lora.py::test_bad_adapter_is_refused_and_others_keep_serving",
    "test_multi_lora.py::test_mixed_batch_equals_peft[qwen2]",
    "test_multi_lora.py::test_lora_metadata_and_scratch_are_reused_across_steps",
    "test_engine.py::test_cpu_prepacked_weights_match_dense_and_free_the_dense_copy",
    "test_tensor_parallel.py",  # spawns 2- and 4-rank gloo groups (~1.5 min on 2 cores)
    "test_tp_engine.py",  # spawned worker ranks per engine; ~1.5 min on 2 cores
    "test_quickstart.py",
    "test_cpu_allocations.py",  # the profiler around every LoRA op call
    "test_server_robustness.py",  # server subprocesses and in-process fault injection
    "test_fuzz_server.py",
    "test_server_sampling.py",
    "test_server_protocol.py",  # an in-process demo server (~15 s on 2 cores)
    "test_server_logprobs.py",
    "test_serve_ray.py",  # a local Ray cluster with 2 engine replicas (~1 min)
    "test_peft_safety.py::test_catastrophic_patterns_refused_quickly",
    "test_sampling_triton.py::test_distribution_matches_exact_probabilities",
    "test_sampling_triton.py::test_negative_infinity_logits_never_drawn",
    "test_sampling_triton.py::test_kernel_compiles_for_sm90",
    "test_paged_attention.py::test_kernels_compile_for_hopper",
    "test_paged_prefill.py::test_kernel_compiles_for_hopper",
    "test_paged_attention.py::test_static_buffer_engine_decode_reads_real_width",
    "test_fused_elementwise.py::test_kernels_compile_for_sm90",
    "test_fused_elementwise.py::test_model_wiring_matches_torch_path",
    "test_adapter_registry.py::test_engine_host_cache_respects_byte_bound_and_serving_dtype",
    "test_multi_lora.py::test_batch_never_exceeds_slot_count",
    # engine- and server-level modules and cases that grew past the minute (11-30: the
    # not-slow selection had reached ~250 s; `--durations=0` sums per test function)
    "test_full_modules.py",
    "test_lm_head_lora.py",
    "test_tools.py",
    "test_guided_server.py",
    "test_models_parity.py",
    "test_models_hub.py",
    "test_server_adapters_peft.py",
    "test_paged_attention.py::test_triton_matches_reference",
    "test_paged_attention.py::test_triton_wide_table_and_graph_padding_rows",
    "test_paged_prefill.py::test_triton_matches_reference",
    "test_models_attention.py::test_triton_window_softcap_matches_reference",
    "test_sampler.py::test_distribution_matches_reference_chi_square",
    "test_dora_ops.py::test_triton_epilogue_applies_column_scales",
    "test_dora.py::test_dora_mixed_batch_equals_peft",
    "test_dora.py::test_dora_slot_reuse_resets_column_scales",
    "test_lora_triton.py::test_kernels_match_oracle[1-",
    "test_lora_triton.py::test_token_counts",
    "test_lora_embedding.py::test_embedding_lora_mixed_batch_equals_peft",
    "test_engine.py::test_score_matches_transformers",
    "test_chunked_prefill.py::test_greedy_identical_over_chunk_budgets_and_prefix_caching",
    "test_logprobs.py::test_prompt_logprobs_over_chunks_and_cached_prefixes",
    "test_guided.py::test_json_schema_draws_all_validate",
    "test_scheduler_fairness.py::test_random_requests_with_aborts_release_every_block_and_pin",
    "test_docs.py::test_real_models_benchmark_commands_use_existing_flags",
    "test_feature_composition.py::test_features_are_identical_under_chunks_and_prefix_caching",
    "test_penalties.py::test_each_penalty_equals_reference_in_a_mixed_batch",
]


def _slow_key(item) -> str:
    return f"{Path(str(item.fspath)).name}::{item.name}"


def pytest_collection_modifyitems(config, items):
    files = {Path(str(item.fspath)).name for item in items}
    used = set()
    for item in items:
        key = _slow_key(item)
        for entry in SLOW:
            if key == entry or key.startswith(entry if "::" in entry else entry + "::"):
                item.add_marker(pytest.mark.slow)
                used.add(entry)
    # (only when whole files were collected: -k or a node id selects part of one)
    whole_files = not config.getoption("keyword") and not any("::" in a for a in config.args)
    stale = [e for e in SLOW if e.split("::")[0] in files and e not in used and whole_files]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py SLOW names no collected test: {stale}")
    if "quickstart" not in (config.getoption("markexpr") or ""):
        ask = pytest.mark.skip(reason="minutes long: run with -m quickstart")
        for item in items:
            if "quickstart" in item.keywords:
                item.add_marker(ask)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=[1, 2])
def torch_threads(request):
    """torch's intra-op thread count for the test (1, then 2), restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(saved)


@pytest.fixture(autouse=True)
def _release_gpu_memory(request):
    """Engines size their KV cache from free GPU memory: free the last test's before the next."""
    yield
    if "gpu" in request.keywords and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()
