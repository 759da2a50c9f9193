"""Tuning as a layer: the step-size sweep, the decision rule, equilibration, the Laplace plateau
check and the stiffness continuation. Its result is a record and a step size the driver uses."""
