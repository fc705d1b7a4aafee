"""amrepro: does activation maximization find the same input for a neuron every time?"""

__version__ = "0.1.0"
