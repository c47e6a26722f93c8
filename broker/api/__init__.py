"""Front doors: turn wire formats into Broker calls and results back into wire formats. They make
no decisions. Each imports core.broker, model and errors - never storage."""
