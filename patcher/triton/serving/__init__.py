"""The bundled tritonserver as a supervised process: installation, ports, the keyed control plane, health probes,
the supervisor that rolls out published versions and restarts what died, and `patcher serve`'s foreground loop."""
