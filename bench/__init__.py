"""Benchmark the gateway against a bare upstream and against nginx + geoip2.

One run starts, all on 127.0.0.1 and on ports the OS hands out:

* a static upstream (nginx, one worker) answering POST /v1/chat/completions with a
  fixed chat-completion body, so the upstream costs next to nothing;
* the gateway (``sys.executable -m gateway serve --workers 1``) with the full benchmark
  policy (bench/policy.yaml: every rule kind, City + ASN + Anonymous-IP test databases)
  and its access log written to a file, twice: alone, and with a shadow policy judged
  beside the active one on every request (bench/policy-shadow.yaml);
* nginx with ngx_http_geoip2_module doing the same block-and-proxy job by country, as
  the reference point of what a C proxy does on the same hardware;

then drives each with wrk (bench/xff.lua: one request in four comes from a refused
country) at 64 connections (throughput) and at 1 connection (latency).

Then the stream benchmarks (bench/streams.py): thousands of
concurrent SSE streams with spaced events from an emitter on the other CPU (gateway
CPU time per relayed event), and many held streams (gateway RSS per stream).

Servers share one CPU and wrk gets the other, so "req/s" means "on one core" and wrk
never competes with what it measures. Results go to stdout as a Markdown table and to
bench/results/latest.json.

Exit status: 0 when every server ran and every sanity check passed, whether or not the
performance targets were met (those are reported as PASS/MISS, since they depend on the
machine); 1 when a sanity check failed (for example the refusal share is not ~25%, so
the numbers would not measure blocking); 2 when the benchmark could not run at all.

Standard library only, plus PyYAML, which the project already depends on.

The parts, in the order a run uses them: common.py (input files, the address rotation, the
request and the upstream's answer), processes.py (tools, CPU pinning, starting and stopping
servers), policy.py (bench/policy.yaml for nginx+geoip2, and its preflight), targets.py (the
servers wrk drives), wrk.py (one run, a target's measurements, the sanity checks),
streamruns.py with streams.py (the stream benchmarks), goals.py (the targets, PASS or MISS),
report.py (tables and JSON) and cli.py (flags, the run, the exit status). The entry point is
still ``python bench/run.py``; the dated figures are in docs/internals/benchmarks.md.
"""
