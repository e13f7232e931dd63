"""Entry-point module of this built-in plugin: its hookimpls register its implementations."""

from tessera.core.hookspecs import Register, hookimpl


@hookimpl
def tessera_register_guided_decoding_backends(register: Register) -> None:
    # lazy targets: a backend's library is imported only when a request selects it
    register("xgrammar", "tessera.plugins.guided.xgrammar:XGrammarBackend")
    register("llguidance", "tessera.plugins.guided.llguidance:LLGuidanceBackend")
    register("outlines", "tessera.plugins.guided.outlines:OutlinesBackend")
    register("lm-format-enforcer", "tessera.plugins.guided.lm_format_enforcer:LMFormatEnforcerBackend")
