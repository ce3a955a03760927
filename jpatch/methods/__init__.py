"""What is measured and how inputs are corrupted: metrics, corruptions, attribution patching
(attribution, edges, agreement) and circuits (circuits, acdc). Built on the engine and model."""
