"""A third-party tessera plugin: registers the `example_json` tool-call parser."""

from tessera.core.hookspecs import hookimpl


@hookimpl
def tessera_register_tool_parsers(register):
    # A lazy "module:attr" target: the parser module is imported only when a server selects it.
    register("example_json", "tessera_example_plugin.tool_parser:ExampleJsonToolParser")
