"""The embedded stack of `pipeline dev` (the `embedded` extra): Tansu, chDB behind
ClickHouse's HTTP interface, and the supervisor of the components. Production
code never imports this package."""
