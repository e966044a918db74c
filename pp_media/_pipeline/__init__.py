"""Step-side: handing each stage-0 forward the media of the microbatch it computes."""
