"""Framework callbacks that save and resume through the SDK (docs/integrations.md).

Each submodule imports its framework; import the one you use (`vaultlayer.integrations.lightning`,
`vaultlayer.integrations.hf`), so `import vaultlayer` stays light.
"""
