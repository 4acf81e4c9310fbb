"""`wtbox mcp`: the operations served to agents over the Model Context Protocol."""
