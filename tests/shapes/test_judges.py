from vargpt.shapes.judges import ShapesDetector, ShapesVQA
from vargpt.shapes.render import render
from vargpt.shapes.scene import Scene, ShapeInstance, ShapesWorldConfig


def test_shapes_vqa_answers_from_the_detector():
    config = ShapesWorldConfig()
    scene = Scene(
        (
            ShapeInstance((1, 0), "circle", "red"),
            ShapeInstance((1, 2), "square", "blue"),
            ShapeInstance((2, 2), "square", "blue"),
        ),
        "grey",
    )
    image = render(scene, config, 48)
    vqa = ShapesVQA(config)
    assert vqa(image, "Is there a red circle?") == "yes"
    assert vqa(image, "Is there a blue circle?") == "no"
    assert vqa(image, "Are there two blue squares?") == "yes"
    assert vqa(image, "Are there three squares?") == "no"
    assert vqa(image, "Is the red circle left of the blue square?") == "yes"
    assert vqa(image, "Is the red circle right of the blue square?") == "no"
    assert vqa(image, "Is the background grey?") == "yes"
    assert vqa(image, "Is the background striped?") == "no"


def test_shapes_detector_reads_small_generated_images_and_keeps_input_coordinates():
    image = render(Scene((ShapeInstance((0, 2), "square", "green"),)), ShapesWorldConfig(), 48).resize((24, 24))
    (found,) = ShapesDetector()(image)
    assert (found.label, found.colour) == ("square", "green")
    assert found.bbox[0] >= 12 and found.bbox[2] <= 24


def test_the_benchmarks_name_the_shapes_judges():
    from vargpt.evaluation.dpg import resolve_vqa
    from vargpt.evaluation.geneval import make_detector

    assert isinstance(make_detector("shapes"), ShapesDetector)
    assert isinstance(resolve_vqa("shapes"), ShapesVQA)
