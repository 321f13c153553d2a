"""The testbed: what tests, benchmarks, `edgeexit bench`, `edgeexit demo` and `edgeexit netsim` need.

Network emulation (``netsim``), the process harness, experiments, scenarios and their reports. It may
import every other part of edgeexit; nothing in the product (core, ``exporters``, ``runtime``) imports it.
"""
