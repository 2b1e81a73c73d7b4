"""Independent references the tests compare expertscope with: textbook loops and the earlier code paths."""
