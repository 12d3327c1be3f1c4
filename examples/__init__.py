"""Worked examples of tvm-fused in the engines that call it (not part of the installed
package): each is run as a test against the engine's own steps."""
