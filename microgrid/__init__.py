"""The composition root: the `microgrid` CLI, which components exist and how a process runs
one, the local stack, the supervisor and the generated interface documents. It may import every
package; none imports it."""
