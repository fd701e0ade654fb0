"""The attention core: one attention function registered with transformers (`interface`), the kernels that
compute a layer's output and log-sum-exp (`kernels`), masks (`masks`) and attention variants (`variants`).

It imports nothing from the rest of sinkscope but `errors`: the model loader (above it) re-installs a lab
model's variant with it, and the capture engine (above the loader) runs every layer through it.
"""
