"""Run by test_engine.py in its own process: sgl.Engine with compression keyword arguments and
two tensor-parallel ranks on the CPU (one core each). Prints the outputs and counters as JSON."""

import json
import os
import sys
import time


def main():
    import dynsplit_sglang

    dynsplit_sglang.activate()  # our Engine.__init__ hook must be in place before Engine(...)
    import sglang as sgl

    from dynsplit_sglang.runtime.report import Reporter

    model, prompts, config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    llm = sgl.Engine(model_path=model, device="cpu", attention_backend="torch_native",
                     disable_cuda_graph=True, max_total_tokens=4096, mem_fraction_static=0.2,
                     max_running_requests=8,  # the block store's rows come out of the 4096
                     dtype="float32", tp_size=2, kv_compression="dynsplit",
                     dynsplit_config=config)
    try:
        out = llm.generate(prompts, {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
        time.sleep(2 * Reporter.MIN_INTERVAL_S)  # the counters' writer publishes the last forward
    finally:
        llm.shutdown()
    stats = json.loads(open(os.environ["DYNSPLIT_STATS_PATH"]).read())
    print("RESULT " + json.dumps({"texts": [o["text"] for o in out], "stats": stats,
                                  "reports": [o["meta_info"]["dynsplit"] for o in out]}))


if __name__ == "__main__":
    main()
