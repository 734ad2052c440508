"""Reading finished and running runs back: their TensorBoard event files, and plots of them."""
